"""A linear layer whose weight is a packed VQ codebook (quant/codebook.py), and model surgery for it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffquant.errors import ConfigError
from diffquant.modules.kinds import LayerKind, register_kind
from diffquant.quant.codebook import CodebookSpec, CodebookWeight, packed_bytes, quantize_weight


@register_kind
class CodebookLinear(LayerKind, nn.Module):
    """Holds packed indices (uint8) and a float16 codebook; the dense weight is rebuilt once and cached.

    Built by `apply_weight_vq`, not by plans: it has no `QuantLayer` parts (no quantizers to calibrate or
    reconstruct, nothing for backends to convert) and is saved by `save_codebook_state`.
    """

    kind = "codebook-linear"
    float_type = nn.Linear

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None):
        super().__init__()
        packed = weight.packed()
        self.register_buffer("packed_indices", packed["indices"])
        self.register_buffer("codebook", packed["codebook"])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight.shape
        self._dense: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            tensors = {"indices": self.packed_indices, "codebook": self.codebook}
            self._dense = CodebookWeight.from_packed(tensors, (self.out_features, self.in_features)).dequantize()
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def packed_bytes(self) -> int:
        return packed_bytes({"indices": self.packed_indices, "codebook": self.codebook})

    # layer kind -----------------------------------------------------------------------------------
    @classmethod
    def wants(cls, plan) -> bool:
        return False  # built by apply_weight_vq from calibration, never from a plan

    @classmethod
    def read_plan_fields(cls, entry: dict) -> dict:
        return {}

    def quantized_parts(self) -> dict:
        return {}

    def joined_weight(self) -> torch.Tensor:
        return self.dense_weight().detach()

    def joined_bias(self) -> torch.Tensor | None:
        return self.bias


def _capture_inputs(model: nn.Module, names: list[str], run: Callable[[], None], limit: int) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers during `run()`, flattened to (N, in), at most `limit` rows each."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(_module, args, _out, name=name):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, chunks in seen.items():
        rows = torch.cat(chunks)
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:limit]
        out[name] = rows[pick]
    return out


def apply_weight_vq(
    model: nn.Module,
    spec: CodebookSpec = CodebookSpec(),
    pattern: str = r".*",
    calibrate: Callable[[], None] | None = None,
    max_rows: int = 2048,
) -> dict:
    """Replace every nn.Linear whose name matches `pattern` by a CodebookLinear, in place.

    With `calibrate` (a callable running the model on calibration data), assignments are refined
    against each layer's output on its recorded inputs (VQ4DiT). Returns a size report.
    """
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(n)]
    if not names:
        raise ConfigError(f"pattern '{pattern}' matches no nn.Linear layer; check the layer names.")
    inputs = _capture_inputs(model, names, calibrate, max_rows) if calibrate is not None else {}
    fp32_bytes = packed = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        weight = quantize_weight(layer.weight, spec, inputs.get(name))
        replacement = CodebookLinear(weight, layer.bias)
        setattr(parent, child, replacement)
        fp32_bytes += layer.weight.numel() * 4
        packed += replacement.packed_bytes()
    return {
        "layers": len(names),
        "fp32_weight_bytes": fp32_bytes,
        "packed_bytes": packed,
        "compression": fp32_bytes / packed,
        "bits_per_weight_effective": 8 * packed / (fp32_bytes / 4),
    }


def save_codebook_state(model: nn.Module, path: str | Path) -> int:
    """Write the model's state (packed VQ layers included) to safetensors; returns bytes of the VQ layers."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, CodebookLinear))


def load_codebook_state(model: nn.Module, path: str | Path) -> None:
    """Load a state written by `save_codebook_state` into a model already converted by `apply_weight_vq`."""
    model.load_state_dict(load_file(str(path)))
    for module in model.modules():
        if isinstance(module, CodebookLinear):
            module._dense = None
