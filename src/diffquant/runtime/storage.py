"""Quantized model directories: packed integer weights in safetensors, structure in JSON.

Layout (a diffusers-style folder):
    config.json                    the diffusers model config (architecture)
    scheduler/scheduler_config.json
    diffquant.json                 what the model generates (ModelInfo)
    quantization.json              method, config, per-layer specs, packed-tensor index, calibration facts
    quantized.safetensors          packed weight codes (uint8), scales, zero-points, per-step banks,
                                   and every tensor left in floating point

Loading rebuilds the architecture from config.json, re-applies the recorded structure and loads
the tensors: nothing is unpickled, and the outputs are bit-identical to the model that was saved.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_directory, ensure_free_space, write_json
from diffquant.model import METADATA_FILE, DiffusionModel, ModelInfo
from diffquant.modules.packed_state import packed_state, unpacked_state
from diffquant.modules.surgery import export_plans, import_plans, quant_layers
from diffquant.quant import group_view, invalid_step_sizes, require_valid_step_sizes

QUANTIZATION_FILE = "quantization.json"
TENSORS_FILE = "quantized.safetensors"
FORMAT_VERSION = 1


def is_quantized_directory(path: str | Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def save_quantized(model: DiffusionModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized model atomically (a crash leaves no half-written directory).

    An existing `directory` that is not a quantized model (and not empty) is refused unless `overwrite`.
    """
    denoiser = model.denoiser
    layers = dict(quant_layers(denoiser))
    unfrozen = [name for name, layer in layers.items() if layer.weight_quantizer is not None and not layer.frozen]
    if unfrozen:
        raise DiffquantError(f"Layers {unfrozen[:3]} still hold float weights: quantize() freezes them before saving.")
    require_valid_step_sizes(denoiser, "Refusing to save")
    tensors, packed_index = packed_state(denoiser)
    structure = export_plans(denoiser)
    record = {
        "format_version": FORMAT_VERSION,
        "diffquant_version": _version(),
        **(model.quantization or {}),
        "structure": structure,
        "packed": packed_index,
        "structure_sha256": _structure_digest(structure, packed_index),
    }
    directory = Path(directory)
    ensure_free_space(directory.parent, sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20))
    with atomic_directory(directory, QUANTIZATION_FILE, overwrite) as scratch:
        write_json(scratch / "config.json", {"_class_name": type(denoiser).__name__, **dict(denoiser.config)})
        write_json(scratch / "scheduler" / "scheduler_config.json", model.scheduler_config)
        write_json(scratch / METADATA_FILE, model.info.to_json())
        save_file(tensors, str(scratch / TENSORS_FILE))
        tensor_file = scratch / TENSORS_FILE
        record["files"] = {TENSORS_FILE: {"sha256": file_sha256(tensor_file), "bytes": tensor_file.stat().st_size}}
        write_json(scratch / QUANTIZATION_FILE, record)
    return directory


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _structure_digest(structure: dict, packed: dict) -> str:
    return hashlib.sha256(json.dumps([structure, packed], sort_keys=True).encode()).hexdigest()


def _drop_stored_rotations(denoiser: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Files written before rotations were rebuilt from the plan hold them: check they match, then drop them."""
    for key in [k for k in tensors if k.endswith(".rotation")]:
        rebuilt = getattr(denoiser.get_submodule(key.removesuffix(".rotation")), "rotation", None)
        if rebuilt is None or not torch.equal(rebuilt, tensors[key]):
            raise DiffquantError(f"The stored rotation '{key}' does not match the layer's plan: the file is corrupt.")
        del tensors[key]


def load_quantized(directory: str | Path) -> DiffusionModel:
    """Load a directory written by `save_quantized` (safetensors + JSON only)."""
    directory = Path(directory)
    try:
        record = json.loads((directory / QUANTIZATION_FILE).read_text())
        config = json.loads((directory / "config.json").read_text())
        info = ModelInfo.from_json(json.loads((directory / METADATA_FILE).read_text()))
        scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DiffquantError(f"{directory} is not a complete quantized model directory: {error}.") from error
    if not isinstance(record, dict) or not isinstance(config, dict):
        raise DiffquantError(f"{directory}: {QUANTIZATION_FILE} and config.json must hold JSON objects.")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise DiffquantError(f"{directory} was written by a newer diffquant (format {record['format_version']}).")
    model_class = getattr(diffusers, config.get("_class_name", ""), None)
    if model_class is None:
        raise DiffquantError(f"{directory}/config.json names an unknown model class '{config.get('_class_name')}'.")
    missing = [key for key in ("structure", "packed") if not isinstance(record.get(key), dict)]
    if missing:
        raise DiffquantError(
            f"{directory / QUANTIZATION_FILE} has no '{missing[0]}' section: the file is incomplete or was "
            "edited. Save the model again (diffquant quantize --out)."
        )
    architecture = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        denoiser = model_class.from_config(architecture)
        import_plans(denoiser, record["structure"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DiffquantError(
            f"{directory / QUANTIZATION_FILE} describes a structure that does not fit {model_class.__name__} "
            f"({type(error).__name__}: {error}); the file was edited or belongs to another model."
        ) from error
    _verify_files(directory, record)
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, SafetensorError) as error:
        raise DiffquantError(f"Cannot read {directory / TENSORS_FILE}: {error}. The file is corrupt.") from error
    layers = dict(quant_layers(denoiser))
    _check_packed_index(directory, record["packed"], layers)
    if "structure_sha256" in record and record["structure_sha256"] != _structure_digest(
        record["structure"], record["packed"]
    ):
        raise DiffquantError(
            f"{directory / QUANTIZATION_FILE}: the layer structure does not match its recorded checksum (the "
            "file was edited). Restore it or quantize the model again."
        )
    unpacked_state(tensors, record["packed"], TENSORS_FILE)
    _drop_stored_rotations(denoiser, tensors)
    try:
        denoiser.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise DiffquantError(f"The tensors in {directory} do not fit the recorded structure: {error}") from error
    check_scales(denoiser, directory)
    denoiser.eval()
    guard_inputs(denoiser)
    quantization = {k: v for k, v in record.items() if k not in ("structure", "packed", "files", "structure_sha256")}
    return DiffusionModel(denoiser, info, scheduler_config, directory, quantization)


def _verify_files(directory: Path, record: dict) -> None:
    """Each tensor file's sha256 against the one recorded at save time (older saves have none)."""
    for name, entry in (record.get("files") or {}).items():
        path = directory / name
        if not path.is_file():
            raise DiffquantError(f"{path} is missing; the model directory is incomplete. Copy or save it again.")
        if file_sha256(path) != entry.get("sha256"):
            raise DiffquantError(
                f"{path} does not match the sha256 recorded in {QUANTIZATION_FILE}: the file is corrupt or was "
                "modified. Copy it again or quantize the model again."
            )


def _check_packed_index(directory: Path, packed: dict, layers: dict) -> None:
    """Every layer's packed bits, shape and dtype must be what its declared weight format implies."""
    where = directory / QUANTIZATION_FILE
    for key, entry in packed.items():
        name = key.removesuffix(".weight_codes")
        layer = layers.get(name)
        if layer is None or layer.weight_quantizer is None:
            raise DiffquantError(f"{where}: packed weights for '{name}', which the structure does not quantize.")
        spec = layer.weight_quantizer.spec
        expected_shape = list(group_view(layer.weight.detach(), layer.weight_quantizer.grouping).shape)
        expected_dtype = "int16" if spec.bits <= 15 else "int32"
        if not isinstance(entry, dict) or entry.get("bits") != spec.bits:
            raise DiffquantError(
                f"{where}: layer '{name}' declares format {spec.format} ({spec.bits} bits) but its packed weights "
                f"hold {entry.get('bits') if isinstance(entry, dict) else entry} bits; the file was edited. "
                "Restore it or quantize again."
            )
        if entry.get("shape") != expected_shape or entry.get("dtype") != expected_dtype:
            raise DiffquantError(
                f"{where}: layer '{name}' has packed weights of shape {entry.get('shape')} ({entry.get('dtype')}) "
                f"where its format needs {expected_shape} ({expected_dtype}); the file was edited."
            )
    for name, layer in layers.items():
        if layer.weight_quantizer is not None and f"{name}.weight_codes" not in packed:
            raise DiffquantError(f"{where}: layer '{name}' is quantized but has no packed weights; the file is corrupt")


def check_scales(denoiser: torch.nn.Module, directory: Path | str = "the model") -> None:
    """Every calibrated quantizer scale must be finite and positive (a zero or NaN scale decodes to garbage)."""
    bad = invalid_step_sizes(denoiser)
    if bad:
        layer = bad[0].rsplit(".", 1)[0] if "." in bad[0] else bad[0]
        raise DiffquantError(
            f"{directory}: layer '{layer}' ({bad[0]}) has a non-positive or non-finite scale; "
            "the model is broken: re-quantize it."
        )


# inputs that stay float32 whatever the model computes in: diffusers builds sinusoidal embeddings and
# rotary positions from them, and bfloat16 cannot hold a timestep like 999 (it rounds to 1000)
FLOAT32_INPUTS = frozenset({"timestep", "timesteps", "guidance", "img_ids", "txt_ids"})


def argument_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The names `module.forward` binds positional arguments to (read once: a compiled graph cannot)."""
    return tuple(inspect.signature(module.forward).parameters)


def _cast_float(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):  # no op at all when it is already there (a compiled graph stays whole)
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):  # SDXL's added_cond_kwargs
        return {k: _cast_float(v, dtype) for k, v in value.items()}
    return value


def cast_float_inputs(names: tuple[str, ...], args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Call arguments with their floating tensors (also inside dicts) in `dtype`, except the
    FLOAT32_INPUTS; `names` (from `argument_names`) names the positional ones."""
    args = tuple(
        a if index < len(names) and names[index] in FLOAT32_INPUTS else _cast_float(a, dtype)
        for index, a in enumerate(args)
    )
    return args, {k: v if k in FLOAT32_INPUTS else _cast_float(v, dtype) for k, v in kwargs.items()}


def _guard_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Clear errors for inputs a quantized model cannot take; inputs are cast to the dtype it computes in."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    expected = getattr(getattr(module, "config", None), "in_channels", None)
    if isinstance(sample, torch.Tensor) and sample.ndim == 4 and expected and sample.shape[1] != expected:
        raise DiffquantError(
            f"The model takes {expected}-channel inputs (N, {expected}, H, W); got shape {tuple(sample.shape)}."
        )
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return cast_float_inputs(module._diffquant_argument_names, args, kwargs, dtype)


def guard_inputs(denoiser: torch.nn.Module) -> None:
    """Check the channels of a quantized denoiser's inputs and cast fp16/bf16 inputs to its dtype."""
    if not getattr(denoiser, "_diffquant_guarded", False):
        denoiser._diffquant_argument_names = argument_names(denoiser)
        denoiser.register_forward_pre_hook(_guard_hook, with_kwargs=True)
        denoiser._diffquant_guarded = True


def _version() -> str:
    from diffquant.version import __version__

    return __version__
