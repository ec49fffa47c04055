"""LoRA files in the diffusers / peft layouts, loaded onto a (quantized, possibly deployed) model.

Key layouts read (a file or a directory holding one):
* diffusers `save_lora_weights`: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (or `unet.`),
  alpha from the `lora_adapter_metadata` JSON in the safetensors header when present;
* peft `save_pretrained`: `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight`,
  alpha from `adapter_config.json` beside it (`lora_alpha`, `alpha_pattern`, `rank_pattern`, `use_rslora`);
* the older diffusers attention-processor layout `<module>.lora.down.weight` / `.lora.up.weight` and
  `<module>.lora_down.weight` / `.lora_up.weight`, with optional per-module `<module>.alpha`.
Without any alpha, alpha = r (scaling 1), as diffusers assumes.

The branch goes beside the layer as a 16-bit float matmul (`modules/lora.py`); the quantized weights are
never touched, so unloading restores the outputs bit-exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.families.base import bare_model
from diffquant.model import DiffusionModel
from diffquant.modules.lora import (
    LoRAFactors,
    adapter_names,
    attach_adapter,
    detach_adapters,
    set_adapter_weights,
)
from diffquant.runtime.export import DeployedDenoiser

FILE_NAMES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "pytorch_lora_weights.bin",
    "adapter_model.bin",
)
"""What a LoRA directory holds (diffusers' `save_lora_weights`, peft's `save_pretrained`)."""

DENOISER_PREFIXES = ("transformer.", "unet.", "base_model.model.")
"""Key prefixes naming the denoiser (peft's wrapper prefix may come on top of diffusers' component prefix)."""

OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te", "te1.", "te2.")

_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_DOWN = {"lora_A", "lora.down", "lora_down"}


def _lora_file(path: Path) -> Path:
    if path.is_dir():
        found = next((path / name for name in FILE_NAMES if (path / name).is_file()), None)
        if found is None:
            raise DiffquantError(f"{path} holds no LoRA weights; expected one of: {', '.join(FILE_NAMES)}.")
        return found
    if not path.is_file():
        raise DiffquantError(f"LoRA file {path} does not exist.")
    return path


def _read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118
        return torch.load(file, map_location="cpu", weights_only=True), {}
    except Exception as error:  # a damaged or foreign file: say which and why
        raise DiffquantError(f"{file} is not a readable LoRA file ({str(error).splitlines()[0][:160]}).") from error


def _adapter_config(file: Path, metadata: dict[str, str]) -> dict:
    """peft's LoraConfig fields: adapter_config.json beside the file, else diffusers' header metadata
    (a pipeline's `save_lora_weights` prefixes each field with its component: `transformer.lora_alpha`)."""
    config_file = file.parent / "adapter_config.json"
    try:
        if config_file.is_file():
            return json.loads(config_file.read_text())
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as error:
        raise DiffquantError(f"The LoRA config of {file} is not valid JSON ({error}).") from error
    for prefix in DENOISER_PREFIXES:
        component = {key.removeprefix(prefix): value for key, value in config.items() if key.startswith(prefix)}
        if component:
            return component
    return config


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha patterns: a key matches a module name ending in it (`(.*\\.)?key$`)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _strip_prefix(key: str) -> str:
    for prefix in DENOISER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def read_lora(path: str | Path) -> dict[str, LoRAFactors]:
    """Module name (relative to the denoiser) -> LoRA factors, from a diffusers or peft LoRA file or directory."""
    file = _lora_file(Path(path))
    tensors, metadata = _read_tensors(file)
    config = _adapter_config(file, metadata)
    others = sorted({key.split(".")[0] for key in tensors if key.startswith(OTHER_COMPONENTS)})
    if others:
        raise ConfigError(
            f"{file} also holds LoRA weights for {', '.join(others)}; diffquant loads LoRAs onto the denoiser only. "
            "Save the denoiser's part alone (e.g. save_lora_weights(transformer_lora_layers=...))."
        )
    if any(key.startswith(("lora_unet_", "lora_transformer_")) for key in tensors):
        raise ConfigError(
            f"{file} is in the kohya / A1111 layout (lora_unet_... keys); convert it to the diffusers layout first "
            "(diffusers' pipeline.load_lora_weights(...) then save_lora_weights(...))."
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in tensors.items():
        stripped = _strip_prefix(key)
        match = _KEY.match(stripped)
        if match:
            part = "down" if match["part"] in _DOWN else "up"
            pairs.setdefault(match["module"], {})[part] = tensor
        elif stripped.endswith(".alpha") and tensor.numel() == 1:
            alphas[stripped.removesuffix(".alpha")] = float(tensor)
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"{file} has keys that are no LoRA factors diffquant reads: {', '.join(unknown[:4])}"
            f"{' ...' if len(unknown) > 4 else ''} (lora_A/lora_B weights only: no DoRA magnitudes, no LoRA biases)."
        )
    adapter = {}
    for module, factors in pairs.items():
        if set(factors) != {"down", "up"}:
            missing = "lora_B" if "down" in factors else "lora_A"
            raise ConfigError(f"{file}: module '{module}' has no {missing} weight; the file is incomplete.")
        down, up = factors["down"], factors["up"]
        rank = down.shape[0]
        config_rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        alpha = alphas.get(module, _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha")))
        if config_rank != rank and module not in alphas:
            raise ConfigError(
                f"{file}: module '{module}' has rank {rank} but its adapter config says r={config_rank}; "
                "the config does not belong to these weights."
            )
        up = up.reshape(up.shape[0], -1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
        adapter[module] = LoRAFactors(down, up, float(rank if alpha is None else alpha), bool(config.get("use_rslora")))
    return adapter


def _denoiser(model: DiffusionModel | nn.Module, changing: bool = False) -> nn.Module:
    """The module LoRA keys are relative to: the diffusers denoiser, inside deployment wrappers if exported.
    `changing`: the adapters are about to change, so a runner that compiled the graph itself (the openvino
    backend) drops its graphs, and the next call compiles one with the adapters as they are then."""
    denoiser = model.denoiser if isinstance(model, DiffusionModel) else model
    runner = denoiser.inner if isinstance(denoiser, DeployedDenoiser) else denoiser
    if changing and hasattr(runner, "forget_compiled"):
        runner.forget_compiled()
    return bare_model(runner)


def load_lora(model: DiffusionModel | nn.Module, path: str | Path, name: str | None = None, scale: float = 1.0) -> str:
    """Attach the LoRA at `path` to `model` (float, quantized or exported) as a 16-bit branch; returns its name.

    The quantized weights stay as they are. `scale` is the adapter's run-time weight (diffusers'
    `set_adapters(..., adapter_weights=)`); change it with `set_lora_scale`, remove it with `unload_lora`.
    """
    path = Path(path)
    name = name or (path.stem if path.is_file() else path.name) or "default"
    attach_adapter(_denoiser(model, changing=True), name, read_lora(path), scale)
    return name


def set_lora_scale(
    model: DiffusionModel | nn.Module, scales: dict[str, float] | float, name: str | None = None
) -> None:
    """Set adapters' run-time weights: a dict name -> weight, or one weight for `name` (or for every adapter)."""
    denoiser = _denoiser(model, changing=True)
    if not isinstance(scales, dict):
        scales = {adapter: float(scales) for adapter in ([name] if name else adapter_names(denoiser))}
    set_adapter_weights(denoiser, scales)


def set_adapters(model: DiffusionModel | nn.Module, names: list[str] | str, weights: list[float] | None = None) -> None:
    """diffusers' `set_adapters`: run exactly the named adapters, with these weights (1.0 each by default)."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ConfigError(f"set_adapters got {len(names)} adapter names but {len(weights)} weights.")
    denoiser = _denoiser(model, changing=True)
    chosen = dict(zip(names, weights, strict=True))
    set_adapter_weights(denoiser, {adapter: chosen.get(adapter, 0.0) for adapter in {*adapter_names(denoiser), *names}})


def unload_lora(model: DiffusionModel | nn.Module, name: str | list[str] | None = None) -> None:
    """Remove the named adapter(s), or all; the model then computes exactly what it did before loading."""
    detach_adapters(_denoiser(model, changing=True), [name] if isinstance(name, str) else name)


def loaded_adapters(model: DiffusionModel | nn.Module) -> list[str]:
    return adapter_names(_denoiser(model))
