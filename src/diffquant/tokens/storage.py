"""Save and load token models as directories: config.json + model.safetensors (bit-exact round trip).

A quantized token denoiser is stored the same way, its weight codes bit-packed and its layer
structure (which layers are quantized, with which specs) in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_directory, write_json
from diffquant.modules.packed_state import packed_state, unpacked_state
from diffquant.modules.surgery import export_plans, import_plans, quant_layers
from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder

_KINDS = {"tokenizer": (VQAutoencoder, TokenizerConfig), "token-denoiser": (TokenDenoiser, DenoiserConfig)}
QUANTIZED_KIND = "quantized-token-denoiser"


def _kind_of(model: torch.nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise DiffquantError(
        f"Cannot save a {type(model).__name__}: only VQAutoencoder and TokenDenoiser are token models."
    )


def save_token_model(model: torch.nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model` (a tokenizer or a token denoiser) to `directory` atomically."""
    kind = _kind_of(model)
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_directory(directory) as scratch:
        save_file(state, str(scratch / "model.safetensors"))
        write_json(scratch / "config.json", {"kind": kind, "config": model.config.to_json(), **(extra or {})})
    return Path(directory)


def save_quantized_token_denoiser(denoiser: TokenDenoiser, directory: str | Path, extra: dict | None = None) -> Path:
    """Write a quantized token denoiser (frozen layers) with bit-packed weight codes, atomically."""
    if not isinstance(denoiser, TokenDenoiser) or not any(True for _ in quant_layers(denoiser)):
        raise DiffquantError("save_quantized_token_denoiser needs a TokenDenoiser quantized by a diffquant method.")
    tensors, index = packed_state(denoiser)
    meta = {"kind": QUANTIZED_KIND, "config": denoiser.config.to_json(), "structure": export_plans(denoiser)}
    with atomic_directory(directory) as scratch:
        save_file(tensors, str(scratch / "model.safetensors"))
        write_json(scratch / "config.json", {**meta, "packed": index, **(extra or {})})
    return Path(directory)


def _load_quantized_denoiser(directory: Path, meta: dict) -> TokenDenoiser:
    denoiser = TokenDenoiser(DenoiserConfig(**meta["config"]))
    import_plans(denoiser, meta["structure"])
    tensors = load_file(str(directory / "model.safetensors"))
    unpacked_state(tensors, meta["packed"], str(directory / "model.safetensors"))
    denoiser.load_state_dict(tensors, strict=True)
    return denoiser.eval()


def load_token_model(directory: str | Path) -> torch.nn.Module:
    """Load a directory written by `save_token_model` or `save_quantized_token_denoiser`, in eval mode."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise DiffquantError(f"{directory} holds no token model (config.json missing); save one with save_token_model.")
    meta = json.loads(config_file.read_text())
    kind = meta.get("kind")
    if kind == QUANTIZED_KIND:
        return _load_quantized_denoiser(directory, meta)
    if kind not in _KINDS:
        raise DiffquantError(
            f"{config_file} is of kind '{kind}', expected one of {', '.join([*_KINDS, QUANTIZED_KIND])}."
        )
    cls, config_cls = _KINDS[kind]
    config = config_cls.from_json(meta["config"]) if hasattr(config_cls, "from_json") else config_cls(**meta["config"])
    model = cls(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
