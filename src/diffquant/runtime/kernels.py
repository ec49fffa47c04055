"""Integer execution of quantized layers: oneDNN int8 on CPU, torch._int_mm / _scaled_mm on CUDA.

Each deployed layer takes the scales our methods calibrated (never a peer library's observers),
quantizes its input with them, runs an integer kernel and returns float32. Per-step activation
parameters (TFMQ-style banks) are kept as tensors and the row is chosen from a shared clock tensor
inside the graph, so `torch.compile` does not recompile at every sampling step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.modules.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.quant import IntFormat, Quantizer

# oneDNN's int8 ops wrapped as opaque operators: inductor then fuses the surrounding quantize
# arithmetic but does not try its own lowering, which would need the weight frozen as a constant
# (and freezing would also bake in the per-step clock). They are defined through torch.library's
# low-level API because `torch.library.custom_op`'s Python wrapper costs ~10 us more per call, which
# is measurable with ~80 GEMMs per denoiser call.
_LIBRARY = torch.library.Library("diffquant", "DEF")
_LIBRARY.define(
    "onednn_int8_linear(Tensor codes, Tensor scale, Tensor zero, Tensor packed, Tensor weight_scale, "
    "Tensor weight_zero, Tensor? bias, str post_op, str post_algorithm, Tensor? output_scale, Tensor? output_zero, "
    "ScalarType out_dtype) -> Tensor",
    tags=(torch.Tag.flexible_layout,),
)
_LIBRARY.define(
    "onednn_int8_conv2d(Tensor codes, Tensor scale, Tensor zero, Tensor packed, Tensor weight_scale, "
    "Tensor weight_zero, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
    "int[] kernel_size, ScalarType out_dtype) -> Tensor",
    tags=(torch.Tag.flexible_layout,),
)


def _onednn_int8_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor,
    bias: torch.Tensor | None,
    post_op: str,
    post_algorithm: str,
    output_scale: torch.Tensor | None,
    output_zero: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """u8 x s8 GEMM; float out (float32 or bfloat16), or uint8 codes on the next layer's grid when it is given. The grid
    comes as tensors (a per-step row picked in the graph) and is read here, outside the compiled graph:
    oneDNN takes it as a number."""
    quantized_out = output_scale is not None
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes,
        scale,
        zero,
        packed,
        weight_scale,
        weight_zero,
        bias,
        float(output_scale) if quantized_out else 1.0,
        int(output_zero) if quantized_out else 0,
        None if quantized_out else out_dtype,
        post_op,
        [],
        post_algorithm,
    )


def _onednn_int8_conv2d(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    kernel_size: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.ops.onednn.qconv2d_pointwise.tensor(
        codes,
        scale,
        zero,
        packed,
        weight_scale,
        weight_zero,
        bias,
        stride,
        padding,
        dilation,
        groups,
        1.0,
        0,
        out_dtype,
        "none",
        [],
        "",
    )
    # oneDNN writes channels-last; returning it as a contiguous NHWC tensor gives compiled graphs a fixed
    # layout without a copy (the module permutes it back to an NCHW-shaped view)
    return out.permute(0, 2, 3, 1).contiguous()


for _key in ("CPU", "MkldnnCPU"):  # the prepacked weight is an MkldnnCPU tensor and picks the dispatch key
    _LIBRARY.impl("onednn_int8_linear", _onednn_int8_linear, _key)
    _LIBRARY.impl("onednn_int8_conv2d", _onednn_int8_conv2d, _key)


@torch.library.register_fake("diffquant::onednn_int8_linear")
def _(codes, scale, zero, packed, weight_scale, weight_zero, bias, post_op, post_algorithm, output_scale, output_zero,
      out_dtype):  # fmt: skip
    dtype = torch.uint8 if output_scale is not None else out_dtype
    return codes.new_empty((codes.shape[0], weight_scale.shape[0]), dtype=dtype)


@torch.library.register_fake("diffquant::onednn_int8_conv2d")
def _(codes, scale, zero, packed, weight_scale, weight_zero, bias, stride, padding, dilation, groups, kernel_size,
      out_dtype):  # fmt: skip
    batch, _, height, width = codes.shape
    sizes = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, pad, dil, k, st in zip((height, width), padding, dilation, kernel_size, stride, strict=True)
    ]
    return codes.new_empty((batch, *sizes, weight_scale.shape[0]), dtype=out_dtype)


class StepClock(nn.Module):
    """The current sampling timestep as a tensor, shared by every per-step layer of a deployed model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("timestep", torch.zeros(()), persistent=False)

    def set(self, timestep: float) -> None:
        self.timestep.fill_(timestep)


@dataclass
class Int8Weight:
    """A frozen layer's weight as oneDNN/`_int_mm` take it: symmetric int8 values and per-output-channel
    float scales. `input_sum_weight` is set when an affine zero-point could not be folded into int8:
    the layer then needs y -= input_sum_weight * (sum of the dequantized input over each output's
    receptive field), which restores w = s * (q - z) exactly."""

    values: torch.Tensor
    scale: torch.Tensor
    input_sum_weight: torch.Tensor | None = None


def int8_weight(layer: QuantLayer) -> Int8Weight:
    """The int8 form of a frozen layer that `weight_supported` accepts.

    The integer weight is v = q + qmin - z. Where v fits int8 (symmetric grids, Q-Diffusion's affine
    4-bit weights) it is used as is; otherwise (affine 8-bit) each channel is shifted by an integer m
    into [-128, 127] and the shift is undone on the output: x.(v) = x.(v + m) - m * sum(x).
    """
    quantizer = layer.weight_quantizer
    fmt = quantizer.fmt
    scale, zero = quantizer.current_params()
    shape = layer._frozen_shape
    channel_shape = (-1, *([1] * (len(shape) - 1)))
    values = (layer.weight_codes.to(torch.int32) + fmt.qmin).reshape(shape)
    zero = torch.zeros(shape[0]) if zero is None else zero.detach().round().reshape(-1).expand(shape[0])
    scale = scale.detach().reshape(-1).float().expand(shape[0]).contiguous()
    values = values - zero.to(torch.int32).reshape(channel_shape)
    low, high = fmt.qmin - zero, fmt.qmax - zero  # each channel's integer range
    shift = torch.where((low >= -128) & (high <= 127), torch.zeros_like(zero), -128 - low)
    values = values + shift.to(torch.int32).reshape(channel_shape)
    correction = None if not bool(shift.any()) else (shift * scale).contiguous()
    return Int8Weight(values.to(torch.int8), scale, correction)


def weight_supported(layer: QuantLayer, max_bits: int = 8) -> bool:
    """Integer weights of <= 8 bits, per-output-channel or per-tensor, with integer zero-points.

    Symmetric grids run as they are; affine grids too when the zero-point folds into int8 (w = s * (q - z)
    is the symmetric int8 weight q - z), and otherwise with a per-channel shift undone on the output
    (see `int8_weight`; convolutions only with groups = 1).
    """
    quantizer = layer.weight_quantizer
    if quantizer is None or not layer.frozen or not isinstance(quantizer.fmt, IntFormat):
        return False
    grouping = quantizer.grouping
    per_out_channel = grouping.kind == "per_channel" and grouping.axis == 0
    if quantizer.fmt.bits > max_bits or not (per_out_channel or grouping.kind == "per_tensor"):
        return False
    zero = quantizer.zero_point.detach()
    if not torch.equal(zero, zero.round()):
        return False
    if issubclass(layer.float_type, nn.Conv2d) and layer.groups != 1:
        return int8_weight(layer).input_sum_weight is None
    return True


def input_supported(quantizer: Quantizer | None, max_bits: int = 8) -> bool:
    """Static per-tensor integer inputs of <= max_bits (optionally one set per step)."""
    return (
        quantizer is not None
        and quantizer.enabled
        and isinstance(quantizer.fmt, IntFormat)
        and quantizer.fmt.bits <= max_bits
        and quantizer.grouping.kind == "per_tensor"
        and not quantizer.spec.dynamic
        and not quantizer.spec.fp_leading_tokens  # a kernel would quantize the kept tokens too
        and quantizer.scale is not None
    )


class _InputQuantizer(nn.Module):
    """Quantizes float inputs to uint8 codes with the calibrated scale/zero-point (or the step's row)."""

    keeps_float32_state = True  # the grid stays float32 in a bfloat16 model

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        fmt = quantizer.fmt
        # signed grids shift by 128 into uint8; the zero-point shifts with them
        self.offset = 128 if fmt.signed else 0
        self.qmin, self.qmax = fmt.qmin + self.offset, fmt.qmax + self.offset
        scale = quantizer.scale.detach().reshape(-1).float()
        zero = quantizer.zero_point.detach().reshape(-1).float() + self.offset
        self.per_step = quantizer.spec.per_step
        self.register_buffer("scales", scale.clone())
        self.register_buffer("zeros", zero.clone())
        self.register_buffer("clock", None, persistent=False)
        if self.per_step:
            self.register_buffer("bank_timesteps", quantizer.bank_timesteps.detach().float().clone())

    def attach_clock(self, clock: torch.Tensor) -> None:
        """Share the deployed model's clock tensor (set in place before every call)."""
        if self.per_step:
            self.clock = clock

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.per_step:
            return self.scales[0], self.zeros[0]
        # index_select, not scales[row]: indexing with a 0-d tensor reads it back to Python (.item()),
        # which breaks the compiled graph at every per-step layer
        row = torch.argmin((self.bank_timesteps - self.clock).abs()).reshape(1)
        return self.scales.index_select(0, row).reshape(()), self.zeros.index_select(0, row).reshape(())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = self.params()
        if x.dtype == torch.uint8:  # already codes on this grid (written by the previous int8 GEMM)
            return x, scale, zero.to(torch.int32)
        # in float32 whatever the compute dtype: bfloat16 cannot hold x / scale to the nearest code above 128
        codes = torch.clamp(torch.round(x.float() / scale) + zero, self.qmin, self.qmax).to(torch.uint8)
        return codes, scale, zero.to(torch.int32)


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def _undo_weight_shift(out: torch.Tensor, codes: torch.Tensor, scale, zero, input_sum_weight) -> torch.Tensor:
    """A linear's output with the per-channel weight shift of `int8_weight` undone (no-op without one)."""
    if input_sum_weight is None:
        return out
    return undo_weight_shift(out, _dequantized(codes, scale, zero), input_sum_weight)


def undo_weight_shift(out: torch.Tensor, dequantized: torch.Tensor, input_sum_weight: torch.Tensor) -> torch.Tensor:
    """`_undo_weight_shift` from the dequantized input itself: x.(v) = x.(v + m) - m * sum(x)."""
    return (out - dequantized.sum(-1, keepdim=True) * input_sum_weight).to(out.dtype)


def _undo_conv_weight_shift(out, codes, scale, zero, layer: nn.Module, stride, padding, dilation) -> torch.Tensor:
    """A convolution's output with the weight shift of `int8_weight` undone, from the layer's `input_sum_weight`
    and all-ones `window` (no-op without a shift). groups == 1: the receptive field spans every input channel."""
    if layer.input_sum_weight is None:
        return out
    return undo_conv_weight_shift(out, _dequantized(codes, scale, zero), layer, stride, padding, dilation)


def undo_conv_weight_shift(out, dequantized: torch.Tensor, layer: nn.Module, stride, padding, dilation) -> torch.Tensor:
    """`_undo_conv_weight_shift` from the dequantized input itself."""
    window_sum = F.conv2d(dequantized.sum(1, keepdim=True), layer.window, None, stride, padding, dilation)
    return (out - window_sum * layer.input_sum_weight.reshape(1, -1, 1, 1)).to(layer.out_dtype)


class OneDNNInt8Linear(nn.Module):
    """Linear on oneDNN's u8s8 int8 GEMM (`onednn::qlinear_pointwise`), float32 (or bfloat16) out."""

    keeps_float32_state = True  # weight scales stay float32; `out_dtype` says what it writes

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        weight = int8_weight(layer)
        self.out_features = weight.values.shape[0]
        self.weight_shape = tuple(layer._frozen_shape)  # the float layer's, for what sits beside it (LoRA)
        self.takes_codes = False  # set when the GEMM before it writes this layer's uint8 codes
        self.input = _InputQuantizer(layer.input_quantizer)
        self.register_buffer("packed_weight", torch.ops.onednn.qlinear_prepack(weight.values, None))
        self.post_op, self.post_algorithm = "none", ""
        # float32 output unless emit_codes_for() names the consumer's input grid (kept off the module tree:
        # the consumer owns it)
        object.__setattr__(self, "output_grid", None)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero", torch.zeros(self.out_features, dtype=torch.int64))
        self.register_buffer("input_sum_weight", weight.input_sum_weight)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.out_dtype = torch.float32  # bfloat16 when the model around it computes in bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        codes, scale, zero = self.input(x.reshape(-1, shape[-1]))
        output_scale, output_zero = (None, None) if self.output_grid is None else self.output_grid.params()
        out = torch.ops.diffquant.onednn_int8_linear(
            codes,
            scale,
            zero,
            self.packed_weight,
            self.weight_scale,
            self.weight_zero,
            self.bias,
            self.post_op,
            self.post_algorithm,
            output_scale,
            output_zero,
            self.out_dtype,
        )
        out = _undo_weight_shift(out, codes, scale, zero, self.input_sum_weight)
        return out.reshape(*shape[:-1], self.out_features)

    @property
    def takes_epilogue(self) -> bool:
        """Whether a post-op or requantization may run inside the GEMM (not when its output still
        needs the zero-point correction)."""
        return self.input_sum_weight is None

    def emit_codes_for(self, consumer: OneDNNInt8Linear) -> bool:
        """Write uint8 codes on `consumer`'s input grid instead of float32 (the requantize happens in
        the GEMM's epilogue, saving a float round trip through memory). Only for full 8-bit grids with
        integer zero-points (oneDNN clamps to the whole uint8 range); a per-step grid works too, the
        step's row being picked in the graph like the consumer's own."""
        grid = consumer.input
        integer_zeros = torch.equal(grid.zeros, grid.zeros.round())
        if not self.takes_epilogue or (grid.qmin, grid.qmax) != (0, 255) or not integer_zeros:
            return False
        object.__setattr__(self, "output_grid", grid)
        consumer.takes_codes = True
        return True

    @property
    def fused_with_neighbours(self) -> bool:
        """Whether its input or output is not the float tensor of the layer it replaced (a GELU epilogue,
        uint8 codes in or out): nothing may be added beside it after export."""
        return self.post_op != "none" or self.output_grid is not None or self.takes_codes

    @property
    def kernel(self) -> str:
        """The kernel and what runs in its epilogue, e.g. `onednn::qlinear_pointwise (GELU fused, u8 out)`."""
        parts = (("GELU fused", self.post_op == "gelu"), ("u8 out", self.output_grid is not None))
        epilogue = [name for name, on in parts if on]
        return "onednn::qlinear_pointwise" + (f" ({', '.join(epilogue)})" if epilogue else "")

    def fuse_gelu(self, approximate: str) -> None:
        """Apply GELU inside the int8 GEMM (oneDNN post-op) instead of as a separate pass."""
        self.post_op, self.post_algorithm = "gelu", "tanh" if approximate == "tanh" else "none"


class FusedGELU(nn.Module):
    """diffusers' GELU activation (Linear then GELU) as one int8 GEMM with a GELU post-op."""

    def __init__(self, linear: OneDNNInt8Linear, approximate: str) -> None:
        super().__init__()
        linear.fuse_gelu(approximate)
        self.proj = linear

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.proj(hidden_states)


# tanh-GELU as x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)), the same function since
# (1 + tanh(u)) / 2 = sigmoid(2u): inductor's vectorized tanh costs about 4x its exp on CPU
_GELU_TANH_SLOPE = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, written through sigmoid (equal up to float rounding)."""
    return x * torch.sigmoid(_GELU_TANH_SLOPE * (x + 0.044715 * x * x * x))


class SigmoidFormGELU(nn.Module):
    """diffusers' tanh-approximate GELU activation (Linear then GELU) where the GELU cannot run in the
    GEMM's epilogue (the output still needs a correction first): compiled, the sigmoid form fuses into
    the correction pass at a quarter of the cost of inductor's tanh."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return gelu_tanh(self.proj(hidden_states))


class OneDNNInt8Conv2d(nn.Module):
    """Conv2d on oneDNN's u8s8 int8 convolution (`onednn::qconv2d_pointwise`), float32 (or bfloat16) out."""

    kernel = "onednn::qconv2d_pointwise"
    keeps_float32_state = True  # weight scales stay float32; `out_dtype` says what it writes

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        weight = int8_weight(layer)
        self.weight_shape = tuple(layer._frozen_shape)
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation, self.groups = list(layer.dilation), layer.groups
        self.kernel_size = list(layer.kernel_size)
        self.input = _InputQuantizer(layer.input_quantizer)
        x_scale, x_zero = (
            self.input.params() if not self.input.per_step else (self.input.scales[0], self.input.zeros[0])
        )
        packed = torch.ops.onednn.qconv_prepack(
            weight.values,
            weight.scale,
            float(x_scale),
            int(x_zero),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            None,
        )
        self.register_buffer("packed_weight", packed)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero", torch.zeros(weight.values.shape[0], dtype=torch.int64))
        self.register_buffer("input_sum_weight", weight.input_sum_weight)
        self.register_buffer("window", torch.ones(1, 1, *self.kernel_size))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.out_dtype = torch.float32  # bfloat16 when the model around it computes in bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = self.input(x)
        nhwc = torch.ops.diffquant.onednn_int8_conv2d(
            codes,
            scale,
            zero,
            self.packed_weight,
            self.weight_scale,
            self.weight_zero,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.kernel_size,
            self.out_dtype,
        )
        out = nhwc.permute(0, 3, 1, 2)
        return _undo_conv_weight_shift(out, codes, scale, zero, self, self.stride, self.padding, self.dilation)


class DequantizedLayer(nn.Module):
    """Weight-only (or unsupported) layers: the weight decoded once at load into float, the input
    fake-quantized as in simulation. Fastest for weight-only formats on CPU (see BENCHMARKS.md)."""

    kernel = "float (dequantized at load)"

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.register_buffer("weight", layer.dequantized_weight().detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = layer.input_quantizer
        self.is_conv = issubclass(layer.float_type, nn.Conv2d)
        if self.is_conv:
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, *self.conv_args)
        return F.linear(x, self.weight, self.bias)


# cuBLAS' int8 GEMM behind `torch._int_mm` takes more than 16 rows (K and N multiples of 8): the
# time-embedding and modulation linears of a batch-1 or batch-2 call are padded up to this many (the
# next multiple of 8 past 16 would do; 32 keeps the padded tile aligned for cuBLASLt's int8 kernels)
CUDA_INT_MM_MIN_ROWS = 32


def int_mm(codes: torch.Tensor, weight_t: torch.Tensor, min_rows: int | None = None) -> torch.Tensor:
    """`torch._int_mm` (int8 x int8 -> int32) for any number of rows: zero rows are added up to `min_rows`
    (by default `CUDA_INT_MM_MIN_ROWS` on CUDA, where cuBLAS needs more than 16, and none elsewhere)."""
    rows = codes.shape[0]
    if min_rows is None:
        min_rows = CUDA_INT_MM_MIN_ROWS if codes.is_cuda else 0
    if rows < min_rows:
        padded = F.pad(codes, (0, 0, 0, min_rows - rows))
        return torch._int_mm(padded, weight_t)[:rows]
    return torch._int_mm(codes, weight_t)


def gemm_shape_supported(layer: QuantLayer, multiple: int) -> bool:
    """Reduction (K) and output (N) sizes that are multiples of `multiple`: cuBLAS' int8 GEMM needs 8,
    `torch._scaled_mm`'s fp8 GEMM 16."""
    out_features, in_features = layer._frozen_shape[0], int(math.prod(layer._frozen_shape[1:]))
    return in_features % multiple == 0 and out_features % multiple == 0


class IntMMLinear(nn.Module):
    """Linear on `torch._int_mm` (int8 x int8 -> int32): the CUDA int8 path (also runs on CPU).

    Affine uint8 activations are shifted to int8; the zero-point term is removed with the weight's
    row sums, so the result equals the fake-quantized layer.
    """

    kernel = "aten::_int_mm"
    keeps_float32_state = True  # weight scales stay float32; `out_dtype` says what it writes

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        weight = int8_weight(layer)
        self.out_features = weight.values.shape[0]
        self.weight_shape = tuple(layer._frozen_shape)
        self.input = _InputQuantizer(layer.input_quantizer)
        # column-major (a transposed view of the row-major weight): the layout cuBLAS' int8 GEMM reads
        self.register_buffer("weight_t", weight.values.contiguous().t())
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_row_sum", weight.values.to(torch.int32).sum(1))
        self.register_buffer("input_sum_weight", weight.input_sum_weight)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.out_dtype = torch.float32  # bfloat16 when the model around it computes in bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        codes, scale, zero = self.input(x.reshape(-1, shape[-1]))
        shifted = (codes.to(torch.int16) - 128).to(torch.int8)
        # GEMM times one (1, N) scale, the zero-point term after: the `_int_mm * mul` shape that inductor's
        # `force_fuse_int_mm_with_mul` fuses into one Triton kernel on CUDA
        out_scale = (scale * self.weight_scale).reshape(1, -1)
        out = int_mm(shifted, self.weight_t) * out_scale - ((zero - 128) * self.weight_row_sum) * out_scale
        if self.bias is not None:
            out = out + self.bias
        out = _undo_weight_shift(out, codes, scale, zero, self.input_sum_weight)
        return out.to(self.out_dtype).reshape(*shape[:-1], self.out_features)


class ScaledMMFloat8Linear(nn.Module):
    """Linear on `torch._scaled_mm` with E4M3 weights and activations (CUDA fp8; also runs on CPU)."""

    kernel = "aten::_scaled_mm (e4m3)"
    keeps_float32_state = True  # the input grid and weight scales stay float32; `out_dtype` says what it writes

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        quantizer = layer.weight_quantizer
        scale, _ = quantizer.current_params()
        from diffquant.quant import from_codes

        values = from_codes(layer.weight_codes, torch.ones_like(scale), None, quantizer.fmt)
        self.out_features = layer._frozen_shape[0]
        self.weight_shape = tuple(layer._frozen_shape)
        self.register_buffer("weight_t", values.reshape(layer._frozen_shape).to(torch.float8_e4m3fn).t())
        self.register_buffer("weight_scale", scale.reshape(1, -1).float())
        self.input_quantizer = layer.input_quantizer
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.out_dtype = torch.float32  # bfloat16 when the model around it computes in bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scale, _ = self.input_quantizer.current_params(flat.reshape(1, -1))
        scale = scale.reshape(()).float()
        codes = (flat.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        ones = torch.ones((), device=x.device)
        # written in the compute dtype straight from the GEMM: half the bytes in a bfloat16 model
        out = torch._scaled_mm(codes, self.weight_t, ones, ones, out_dtype=self.out_dtype)
        out = out * (scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(self.out_dtype).reshape(*shape[:-1], self.out_features)


def unpack_low_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Tensor-op unpacking of 1/2/4/8-bit codes (compilable; same layout as `quant.pack_codes`)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]


class PackedWeightLayer(nn.Module):
    """Weight-only layer that keeps its weight packed in memory (1, 2, 4 or 8 bits per weight) and
    decodes it on the fly at every call; the input is fake-quantized as in simulation if the method
    quantized it."""

    kernel = "float (weights decoded on the fly from packed codes)"
    keeps_float32_state = True  # decodes in float32 and computes in the input's dtype

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        from diffquant.quant import pack_codes

        quantizer = layer.weight_quantizer
        self.bits = quantizer.spec.bits
        self.view_shape = tuple(layer.weight_codes.shape)
        self.weight_shape = tuple(layer._frozen_shape)
        self.count = layer.weight_codes.numel()
        self.register_buffer("packed", pack_codes(layer.weight_codes.to(torch.int64), self.bits))
        scale, zero_point = quantizer.current_params()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.fmt, self.grouping = quantizer.fmt, quantizer.grouping
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = layer.input_quantizer
        self.is_conv = issubclass(layer.float_type, nn.Conv2d)
        if self.is_conv:
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def supports(layer: QuantLayer) -> bool:
        quantizer = layer.weight_quantizer
        return quantizer is not None and layer.frozen and quantizer.spec.bits in (1, 2, 4, 8)

    def weight(self) -> torch.Tensor:
        from diffquant.quant import from_codes, ungroup

        codes = unpack_low_bits(self.packed, self.bits, self.count).reshape(self.view_shape)
        return ungroup(from_codes(codes, self.scale, self.zero_point, self.fmt), self.weight_shape, self.grouping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, weight, bias, *self.conv_args)
        return F.linear(x, weight, bias)
