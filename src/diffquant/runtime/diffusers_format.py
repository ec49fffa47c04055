"""diffusers-native quantized checkpoints: a directory `from_pretrained` loads without diffquant.

The serialisable backend used is optimum-quanto's layout (diffusers' `QuantoQuantizer`, which loads
pre-quantized checkpoints on CPU): `config.json` carries `quantization_config = {"quant_method":
"quanto", "weights_dtype": "int8", "modules_to_not_convert": [...]}` and every converted linear stores
`weight._data` (int8) and `weight._scale` (one fp32 scale per output channel) next to its bias.
(torchao checkpoints are pickled tensor subclasses, not safetensors; GGUF is load-only in diffusers.)

What survives exactly: linear weights on a symmetric per-channel (or per-tensor) integer grid of at most
8 bits - naive, PTQ4DM, TFMQ-DM and EDA-DM weights at W8 and below, Q-Diffusion with symmetric weights.
quanto keeps codes of fewer than 8 bits in int8 (exact, but stored at 8 bits). What does not:
* activation quantizers (diffusers' quanto config is weight-only) and therefore per-step activation
  parameters (TFMQ-DM) - the exported model computes activations in float;
* attention-matmul quantization (Q-Diffusion, EDA-DM) - float;
* asymmetric or group-wise weights (Q-Diffusion's default asymmetric weights, GGUF grids): rounded to
  nearest onto int8 per-channel here (listed in the report as `rounded`);
* convolutions: diffusers' quanto path converts only nn.Linear, so they are stored as float values
  (their dequantized weights, exact).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from diffquant.fileio import atomic_directory, write_json
from diffquant.modules.kinds import is_kind
from diffquant.modules.layers import QuantLayer
from diffquant.modules.surgery import activation_quantizers
from diffquant.quant import IntFormat
from diffquant.runtime.gguf import float_state_names

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _int8_channels(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes, per-channel scale (out, 1)) when the layer's weight grid is exactly quanto's qint8."""
    if not _is_quantized(layer) or not layer.frozen:
        return None
    quantizer = layer.weight_quantizer
    spec, fmt = quantizer.spec, quantizer.fmt
    if not isinstance(fmt, IntFormat) or not fmt.signed or fmt.bits > 8 or spec.gguf is not None:
        return None
    if spec.granularity not in ("per_channel", "per_tensor") or (spec.granularity == "per_channel" and spec.axis):
        return None
    if quantizer.zero_point is not None and bool(quantizer.zero_point.ne(0).any()):
        return None
    out = layer._frozen_shape[0]
    codes = (layer.weight_codes.to(torch.int64) + fmt.qmin).reshape(out, -1)
    scale = quantizer.scale.detach().float().reshape(-1, 1).expand(out, 1).contiguous()
    return codes.to(torch.int8), scale


def _round_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 round-to-nearest (quanto's own rule: absmax / 127)."""
    scale = (weight.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.clamp(torch.round(weight / scale), -127, 127).to(torch.int8), scale.float()


def _float_weight(module: nn.Module) -> torch.Tensor:
    return module.joined_weight() if is_kind(module) else module.weight.detach()


def export_diffusers(model: Any, directory: str | Path) -> dict[str, Any]:
    """Write `model` (DiffusionModel or denoiser) as a quanto-int8 diffusers directory; return what survived."""
    denoiser = getattr(model, "denoiser", model)
    linears = {n: m for n, m in denoiser.named_modules() if _is_linear(m)}
    exact = {n: grid for n, m in linears.items() if (grid := _int8_channels(m)) is not None}
    by_local_name: dict[str, list[str]] = {}
    for name in linears:
        by_local_name.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    # quanto skips modules by their local name: a local name whose linears are all float stays float
    not_converted = sorted(
        local for local, names in by_local_name.items() if not any(_is_quantized(linears[n]) for n in names)
    )
    kept = {n for local in not_converted for n in by_local_name[local]}
    tensors: dict[str, torch.Tensor] = {}
    rounded: list[str] = []
    for key in float_state_names(denoiser):
        module_name, _, attribute = key.rpartition(".")
        module = denoiser.get_submodule(module_name) if module_name else denoiser
        if module_name in linears and module_name not in kept and attribute == "weight":
            if module_name in exact:
                data, scale = exact[module_name]
            else:
                data, scale = _round_int8(_float_weight(module).float())
                rounded.append(module_name)
            tensors[f"{key}._data"] = data.contiguous()
            tensors[f"{key}._scale"] = scale.contiguous()
            tensors[f"{module_name}.input_scale"] = torch.ones(())
            tensors[f"{module_name}.output_scale"] = torch.ones(())
        elif attribute == "weight" and is_kind(module):  # a layer kind's weight, joined (quanto knows no kinds)
            tensors[key] = _float_weight(module).float().contiguous()
        elif attribute == "bias" and is_kind(module):
            tensors[key] = module.joined_bias().contiguous()
        else:
            tensors[key] = getattr(module, attribute).detach().contiguous()
    dropped = sorted({name.rsplit(".", 1)[0] for name, q in activation_quantizers(denoiser) if q.enabled})
    per_step = any(q.spec.per_step for _, q in activation_quantizers(denoiser))
    config = {"_class_name": type(denoiser).__name__, **dict(denoiser.config)}
    config["quantization_config"] = {
        "quant_method": "quanto",
        "weights_dtype": "int8",
        "modules_to_not_convert": not_converted,
    }
    report = {
        "backend": "quanto int8 (diffusers QuantoQuantizer layout)",
        "exact_linears": len(exact),
        "rounded_linears": rounded,
        "float_linears": sorted(kept),
        "activation_quantizers_dropped": len(dropped),
        "per_step_parameters_dropped": per_step,
    }
    report["summary"] = (
        f"{len(exact)} linears exact, {len(rounded)} rounded to int8 per channel, {len(kept)} float; "
        f"{len(dropped)} activation quantizers not representable (float activations)"
        + ("; per-step parameters dropped" if per_step else "")
    )
    with atomic_directory(Path(directory)) as scratch:
        write_json(scratch / "config.json", json.loads(json.dumps(config, default=str)))
        write_json(scratch / "diffquant_export.json", report)
        save_file(tensors, str(scratch / WEIGHTS_FILE))
    return report


def _is_linear(module: nn.Module) -> bool:
    quantized = isinstance(module, QuantLayer) and issubclass(module.float_type, nn.Linear)
    return isinstance(module, nn.Linear) or quantized


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLayer) and module.weight_quantizer is not None
