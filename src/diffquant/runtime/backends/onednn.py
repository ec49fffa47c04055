"""The onednn backend: CPU int8 convolutions and linears on oneDNN (`qconv2d_pointwise`, `qlinear_pointwise`).

Layers with <= 8-bit symmetric per-channel weights and static per-tensor <= 8-bit inputs run on int8;
other layers run with float activations (`weight_only_layer`), or on PyTorch's CPU int4 GEMM with
`weight_only_mode="int4-kernel"`.
"""

from __future__ import annotations

import platform

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.layers import QuantLayer
from diffquant.runtime.backends.base import DEFAULT_WEIGHT_ONLY_MODE, Backend, register_backend, weight_only_layer
from diffquant.runtime.kernels import (
    FusedGELU,
    OneDNNInt8Conv2d,
    OneDNNInt8Linear,
    SigmoidFormGELU,
    input_supported,
    weight_supported,
)
from diffquant.runtime.kernels_int4 import Int4PackMMLinear, int4pack_group_size

INT8_KERNELS = {"linear": OneDNNInt8Linear, "conv2d": OneDNNInt8Conv2d}
"""Layer kind -> oneDNN int8 module."""


@register_backend
class OneDNNBackend(Backend):
    name = "onednn"
    int8_kernels: dict[str, type[nn.Module]] = INT8_KERNELS

    def check_available(self) -> None:
        machine = platform.machine().lower()
        if not torch.backends.mkldnn.is_available() or machine not in ("x86_64", "amd64"):
            raise DiffquantError(
                f"The onednn backend needs an x86-64 CPU with PyTorch's oneDNN (this is {machine}); use --backend fake."
            )
        if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
            raise DiffquantError("This PyTorch build lacks oneDNN's quantized ops; use --backend fake.")

    def supports(self, layer: QuantLayer) -> bool:
        return layer.kind in INT8_KERNELS

    def convert(self, layer: QuantLayer, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
        if weight_supported(layer) and input_supported(layer.input_quantizer):
            return self.int8_kernels[layer.kind](layer)
        if weight_only_mode == "int4-kernel" and int4pack_group_size(layer) is not None:
            return Int4PackMMLinear(layer)
        return weight_only_layer(layer, weight_only_mode)

    def finish(self, model: nn.Module) -> None:
        # a separate tanh-GELU pass costs more than the int8 GEMM before it on CPU: into its epilogue
        fuse_gelus(model, OneDNNInt8Linear, FusedGELU)
        _chain_int8_outputs(model)


def _chain_int8_outputs(model: nn.Module) -> None:
    """Inside diffusers' FeedForward (GELU projection -> dropout -> linear), let the first int8 GEMM
    write uint8 codes for the second: the intermediate is the widest activation of a transformer block
    and would otherwise go through memory as float32 only to be quantized again."""
    for gemm, consumer in feedforward_gemm_pairs(model, FusedGELU):
        if isinstance(gemm, OneDNNInt8Linear) and isinstance(consumer, OneDNNInt8Linear):
            gemm.emit_codes_for(consumer)


def fuse_gelus(model: nn.Module, linear_type: type[nn.Module], fused_type: type[nn.Module]) -> None:
    """Replace each diffusers GELU whose projection is a `linear_type` kernel by `fused_type(proj, approximate)`
    (the GELU in the GEMM's epilogue), or, when the GEMM's output still needs its weight-shift correction
    (`takes_epilogue` false), a tanh-GELU by its cheaper sigmoid form after it."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, GELU) or not isinstance(module.proj, linear_type):
            continue
        if module.proj.takes_epilogue:
            replacement = fused_type(module.proj, module.approximate)
        elif module.approximate == "tanh":  # the GEMM's output needs its weight-shift correction first
            replacement = SigmoidFormGELU(module.proj)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def feedforward_gemm_pairs(model: nn.Module, fused_type: type[nn.Module]) -> list[tuple[nn.Module, nn.Module]]:
    """(producer GEMM, next layer) of each consecutive pair inside diffusers' FeedForward blocks, looking
    through dropout (the identity in eval) and through a `fused_type` GELU to its projection."""
    pairs = []
    for module in model.modules():
        if not isinstance(module, FeedForward):
            continue
        layers = [m for m in module.net if not isinstance(m, nn.Dropout)]
        for producer, consumer in zip(layers, layers[1:], strict=False):
            pairs.append((producer.proj if isinstance(producer, fused_type) else producer, consumer))
    return pairs
