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

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_directory, write_json
from diffquant.model import METADATA_FILE, DiffusionModel, ModelInfo
from diffquant.modules.surgery import export_plans, import_plans, quant_layers
from diffquant.quant import pack_codes, unpack_codes

QUANTIZATION_FILE = "quantization.json"
TENSORS_FILE = "quantized.safetensors"
FORMAT_VERSION = 1


def is_quantized_directory(path: str | Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def save_quantized(model: DiffusionModel, directory: str | Path) -> Path:
    """Write a quantized model atomically (a crash leaves no half-written directory)."""
    denoiser = model.denoiser
    layers = dict(quant_layers(denoiser))
    unfrozen = [name for name, layer in layers.items() if layer.weight_quantizer is not None and not layer.frozen]
    if unfrozen:
        raise DiffquantError(f"Layers {unfrozen[:3]} still hold float weights: quantize() freezes them before saving.")
    state = denoiser.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    packed_index: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.endswith(".weight_codes"):
            layer = layers[key.removesuffix(".weight_codes")]
            bits = layer.weight_quantizer.spec.bits
            codes = value.to(torch.int64)
            tensors[key + ".packed"] = pack_codes(codes, bits)
            packed_index[key] = {"bits": bits, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[1]}
        else:
            tensors[key] = value.detach().contiguous()
    record = {
        "format_version": FORMAT_VERSION,
        "diffquant_version": _version(),
        **(model.quantization or {}),
        "structure": export_plans(denoiser),
        "packed": packed_index,
    }
    directory = Path(directory)
    with atomic_directory(directory) as scratch:
        write_json(scratch / "config.json", {"_class_name": type(denoiser).__name__, **dict(denoiser.config)})
        write_json(scratch / "scheduler" / "scheduler_config.json", model.scheduler_config)
        write_json(scratch / METADATA_FILE, model.info.to_json())
        write_json(scratch / QUANTIZATION_FILE, record)
        save_file(tensors, str(scratch / TENSORS_FILE))
    return directory


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
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise DiffquantError(f"{directory} was written by a newer diffquant (format {record['format_version']}).")
    model_class = getattr(diffusers, config.get("_class_name", ""), None)
    if model_class is None:
        raise DiffquantError(f"{directory}/config.json names an unknown model class '{config.get('_class_name')}'.")
    architecture = {k: v for k, v in config.items() if not k.startswith("_")}
    denoiser = model_class.from_config(architecture)
    import_plans(denoiser, record["structure"])
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, SafetensorError) as error:
        raise DiffquantError(f"Cannot read {directory / TENSORS_FILE}: {error}. The file is corrupt.") from error
    for key, entry in record["packed"].items():
        packed = tensors.pop(key + ".packed", None)
        if packed is None:
            raise DiffquantError(f"{TENSORS_FILE} lacks the packed weights of '{key}': the file is corrupt.")
        count = 1
        for dim in entry["shape"]:
            count *= dim
        codes = unpack_codes(packed, entry["bits"], count).reshape(entry["shape"])
        tensors[key] = codes.to(getattr(torch, entry["dtype"]))
    try:
        denoiser.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise DiffquantError(f"The tensors in {directory} do not fit the recorded structure: {error}") from error
    denoiser.eval()
    quantization = {k: v for k, v in record.items() if k not in ("structure", "packed")}
    return DiffusionModel(denoiser, info, scheduler_config, directory, quantization)


def _version() -> str:
    from diffquant.version import __version__

    return __version__
