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
from diffquant.modules.structure import run_with_hooks
from diffquant.quant.codebook import CodebookSpec, CodebookWeight, packed_bytes, quantize_weight


@register_kind
class CodebookLinear(LayerKind, nn.Module):
    """Holds packed indices (uint8) and a float16 codebook; the dense weight is rebuilt once and cached.

    With a low-rank branch (CodebookSpec.rank > 0, LR²VQ) it also holds float16 `branch_up` (out, r) and
    `branch_down` (r, in); the dense weight is then VQ(R) + up @ down. Without one its state is unchanged.

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
        if weight.rank:  # only then: a plain codebook layer keeps its state dict keys
            self.register_buffer("branch_up", packed["up"])
            self.register_buffer("branch_down", packed["down"])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight.shape
        self._dense: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.branch_up.shape[1] if hasattr(self, "branch_up") else 0

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """What is stored for the weight (the `CodebookWeight.packed` layout)."""
        tensors = {"indices": self.packed_indices, "codebook": self.codebook}
        if self.rank:
            tensors.update(up=self.branch_up, down=self.branch_down)
        return tensors

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            shape = (self.out_features, self.in_features)
            self._dense = CodebookWeight.from_packed(self.packed_tensors(), shape).dequantize()
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def packed_bytes(self) -> int:
        """Indices, codebook and (with a rank) the float16 branch: every byte the weight takes on disk."""
        return packed_bytes(self.packed_tensors())

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

    def extra_repr(self) -> str:
        bits = self.packed_indices.numel() * 8 // (self.out_features * self.in_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, codebook={tuple(self.codebook.shape)}, "
            f"index_bits_per_weight={bits}, rank={self.rank}"
        )


def _capture_inputs(model: nn.Module, names: list[str], run: Callable[[], None], limit: int) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers during `run()`, flattened to (N, in), at most `limit` rows each."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(_module, args, _out, name=name):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(modules[name].register_forward_hook(hook))
    run_with_hooks(run, handles)
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
    against each layer's output on its recorded inputs (VQ4DiT). With `spec.rank` > 0 each layer also
    keeps a float16 low-rank branch (LR²VQ), counted in the size report. Returns a size report.
    """
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(n)]
    if not names:
        raise ConfigError(f"pattern '{pattern}' matches no nn.Linear layer; check the layer names.")
    for name in names:  # before the calibration run: a rank that does not fit fails at once
        try:
            spec.validate_for(tuple(model.get_submodule(name).weight.shape))
        except ConfigError as error:
            raise ConfigError(f"layer '{name}': {error}") from None
    inputs = _capture_inputs(model, names, calibrate, max_rows) if calibrate is not None else {}
    fp32_bytes = packed = branch = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        weight = quantize_weight(layer.weight, spec, inputs.get(name))
        replacement = CodebookLinear(weight, layer.bias)
        setattr(parent, child, replacement)
        fp32_bytes += layer.weight.numel() * 4
        packed += replacement.packed_bytes()
        branch += packed_bytes({k: v for k, v in replacement.packed_tensors().items() if k in ("up", "down")})
    return {
        "layers": len(names),
        "rank": spec.rank,
        "branch_bytes": branch,  # already inside packed_bytes
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
