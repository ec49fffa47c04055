"""int8 layers written in PT2E's reference form, lowered to oneDNN by inductor's own quantization passes.

Each layer quantizes its input with the grid our method calibrated (the simulation's x / s rounding),
then states its matmul as PT2E's converted graphs do: dequantize the uint8 codes, dequantize the int8
per-channel weight, float linear or convolution. Compiled with inductor freezing (the `inductor`
backend asks `DeployedDenoiser` for it), inductor's pattern passes turn that into
`onednn::qlinear_pointwise` / `qconv2d_pointwise` with the weight prepacked as a constant, and fuse
around them what they fuse for PT2E (GELU and residual-add post-ops, uint8 and bfloat16 outputs): the same
kernels and glue as PT2E, with no Python operator wrapper per call (docs/DEPLOYMENT.md has the numbers).
Uncompiled (or with gradients on) the same graph runs as a float simulation of the int8 GEMM: correct, but
without the speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.modules.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.runtime.kernels import _InputQuantizer, _undo_conv_weight_shift, _undo_weight_shift, int8_weight

# registers the quantized_decomposed operators (PT2E's reference ops) with the dispatcher
import torch.ao.quantization.fx._decomposed  # noqa: F401,E402  isort: skip

_DECOMPOSED = torch.ops.quantized_decomposed


class _ReferenceInt8(nn.Module):
    """What the linear and the convolution share: the int8 weight, its scales and the input grid."""

    keeps_float32_state = True  # weight scales stay float32; `out_dtype` says what it computes in

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        weight = int8_weight(layer)
        self.weight_shape = tuple(layer._frozen_shape)
        self.input = _InputQuantizer(layer.input_quantizer)
        self.register_buffer("weight_values", weight.values)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero", torch.zeros(weight.values.shape[0], dtype=torch.int64))
        self.register_buffer("input_sum_weight", weight.input_sum_weight)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.out_dtype = torch.float32  # bfloat16 when the model around it computes in bfloat16
        # a fixed grid goes in as numbers (PT2E's static form); a per-step one as the step's row
        fixed = None if self.input.per_step else self.input.params()
        self._fixed_grid = None if fixed is None else (float(fixed[0]), int(fixed[1]))
        self.requantized = False

    @property
    def takes_epilogue(self) -> bool:
        """Whether a post-op may run inside the GEMM (not when its output still needs the zero-point correction)."""
        return self.input_sum_weight is None

    def requantize_in_producer(self) -> bool:
        """Quantize the input with PT2E's `quantize_per_tensor`, which inductor folds into the int8 GEMM
        that produced it (uint8 out, oneDNN's requantization: x * (1 / s) rounded, as the onednn backend's
        chained GEMMs do). Only fixed full 8-bit grids; returns whether it took."""
        if self._fixed_grid is None or (self.input.qmin, self.input.qmax) != (0, 255):
            return False
        self.requantized = True
        return True

    def _dequantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._fixed_grid is None:
            codes, scale, zero = self.input(x)
            dq = _DECOMPOSED.dequantize_per_tensor.tensor(codes, scale, zero, 0, 255, torch.uint8)
            return dq.to(self.out_dtype), codes, scale, zero
        fixed_scale, fixed_zero = self._fixed_grid
        if self.requantized:
            codes = _DECOMPOSED.quantize_per_tensor.default(x, fixed_scale, fixed_zero, 0, 255, torch.uint8)
            scale, zero = self.input.params()
            zero = zero.to(torch.int32)
        else:
            codes, scale, zero = self.input(x)
        dq = _DECOMPOSED.dequantize_per_tensor.default(codes, fixed_scale, fixed_zero, 0, 255, torch.uint8)
        return dq.to(self.out_dtype), codes, scale, zero

    def _dequantized_weight(self) -> torch.Tensor:
        weight = _DECOMPOSED.dequantize_per_channel.default(
            self.weight_values, self.weight_scale, self.weight_zero, 0, -128, 127, torch.int8
        )
        return weight.to(self.out_dtype)


class InductorInt8Linear(_ReferenceInt8):
    """Linear as dequantize -> linear, lowered by inductor to `onednn::qlinear_pointwise`."""

    kernel = "onednn::qlinear_pointwise (inductor-lowered)"

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        self.out_features = self.weight_values.shape[0]  # read by LoRA and the model-surgery code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # any rank, as PT2E leaves it: a reshape of our own between the GEMM and its GELU hides the pair
        # from inductor's fusion patterns
        dq, codes, scale, zero = self._dequantized_input(x)
        out = F.linear(dq, self._dequantized_weight(), self.bias)
        return _undo_weight_shift(out, codes, scale, zero, self.input_sum_weight)


class InductorInt8Conv2d(_ReferenceInt8):
    """Conv2d as dequantize -> convolution, lowered by inductor to `onednn::qconv2d_pointwise`."""

    kernel = "onednn::qconv2d_pointwise (inductor-lowered)"

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__(layer)
        self.conv_args = (tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
        self.register_buffer("window", torch.ones(1, 1, *layer.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq, codes, scale, zero = self._dequantized_input(x)
        out = F.conv2d(dq, self._dequantized_weight(), self.bias, *self.conv_args)
        return _undo_conv_weight_shift(out, codes, scale, zero, self, *self.conv_args[:3])


_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


class DecomposedGELU(nn.Module):
    """diffusers' GELU activation (Linear then GELU) with the GELU written op by op in the form inductor's
    int8 linear + GELU fusion matches (`mkldnn_fusion._gelu_fusion_1/2`, in float32 as autocast leaves
    it), so it runs as oneDNN's GELU post-op; `torch.nn.functional.gelu` itself is not matched."""

    def __init__(self, proj: nn.Module, approximate: str) -> None:
        super().__init__()
        self.proj, self.approximate = proj, approximate

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.proj(hidden_states)
        dtype, y = y.dtype, y.float()
        if self.approximate == "tanh":
            out = (y * 0.5) * (torch.tanh((y + y * y * y * 0.044715) * _SQRT_2_OVER_PI) + 1)
        else:
            out = (y * 0.5) * (torch.erf(y * _SQRT_HALF) + 1)
        return out.to(dtype)
