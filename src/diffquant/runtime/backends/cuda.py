"""The cuda backend: int8 linears on `torch._int_mm`, fp8 (E4M3) linears on `torch._scaled_mm`; other
layers (convolutions included) with float activations (`weight_only_layer`)."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.layers import QuantLayer
from diffquant.quant import FloatFormat
from diffquant.runtime.backends.base import DEFAULT_WEIGHT_ONLY_MODE, Backend, register_backend, weight_only_layer
from diffquant.runtime.kernels import (
    IntMMLinear,
    ScaledMMFloat8Linear,
    gemm_shape_supported,
    input_supported,
    weight_supported,
)


def _float8_ready(layer: QuantLayer) -> bool:
    """E4M3 weights and static per-tensor E4M3 inputs (one set for all steps): what `_scaled_mm` takes."""
    weight_fmt = layer.weight_quantizer.fmt if layer.weight_quantizer else None
    input_fmt = layer.input_quantizer.fmt if layer.input_quantizer else None
    return (
        isinstance(weight_fmt, FloatFormat)
        and weight_fmt.name == "e4m3"
        and isinstance(input_fmt, FloatFormat)
        and input_fmt.name == "e4m3"
        and layer.input_quantizer.grouping.kind == "per_tensor"
        and not layer.input_quantizer.spec.per_step
    )


@register_backend
class CudaBackend(Backend):
    name = "cuda"
    device = "cuda"

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise DiffquantError(
                "The cuda backend needs a CUDA GPU and a CUDA build of PyTorch, and this machine has none; "
                "use --backend onednn (CPU int8) or fake."
            )

    def supports(self, layer: QuantLayer) -> bool:
        return layer.kind in ("linear", "conv2d")

    def convert(self, layer: QuantLayer, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
        if layer.kind == "linear":  # GEMM kernels; convolutions run with float activations
            if weight_supported(layer) and input_supported(layer.input_quantizer) and gemm_shape_supported(layer, 8):
                return IntMMLinear(layer)
            if _float8_ready(layer) and gemm_shape_supported(layer, 16):
                return ScaledMMFloat8Linear(layer)
        return weight_only_layer(layer, weight_only_mode)
