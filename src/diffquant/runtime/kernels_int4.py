"""Weight-only layers whose <= 4-bit integer weights stay packed in memory (two codes per byte).

* `PackedInt4Layer` (linear and conv): the nibbles are decoded at every call into the compute dtype
  and fed to the ordinary GEMM/convolution. On CPUs with bf16 matrix units (AVX512-BF16/AMX) the
  compute dtype is bfloat16, which is what makes weight-only pay: the decode is cheap next to the
  bf16 GEMM, and resident weights are ~1/8 of fp32.
* `Int4PackMMLinear` (linear): PyTorch's CPU int4 GEMM `_weight_int4pack_mm_for_cpu`, which reads the
  packed weight inside the kernel (fast only for a handful of rows: batch-1 token counts of a
  diffusion model are far above that, see benchmarks/realsize_speed.py).

Both compute w = s * (q + qmin - z) from the codes q the methods froze, with the method's group-wise
scales s and zero-points z.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.modules.layers import QuantLayer, QuantLinear
from diffquant.quant import IntFormat, ungroup

# group sizes `_weight_int4pack_mm_for_cpu` accepts (largest first: fewer scales)
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)


@functools.cache
def bf16_matmul_supported() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (AVX512-BF16 or AMX), so bf16 beats fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_compute_dtype() -> torch.dtype:
    return torch.bfloat16 if bf16_matmul_supported() else torch.float32


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, ceil(K/2)) uint8: column j in the low nibble, column j + ceil(K/2)
    in the high one (decoding is then a concatenation, which vectorizes, not an interleave)."""
    half = (codes.shape[1] + 1) // 2
    padded = F.pad(codes.to(torch.uint8), (0, 2 * half - codes.shape[1]))
    return (padded[:, :half] | (padded[:, half:] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (N, count) uint8 codes."""
    return torch.cat([packed & 15, packed >> 4], dim=1)[:, :count]


def _code_matrix(layer: QuantLayer) -> torch.Tensor:
    """The frozen codes as an (out, reduction) matrix in the GEMM's order."""
    quantizer = layer.weight_quantizer
    shape = layer._frozen_shape
    return ungroup(layer.weight_codes, shape, quantizer.grouping).reshape(shape[0], -1)


def _group_params(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, offset, group size) with scale/offset shaped (N or 1, K/G or 1, 1) for a (N, K/G, G) view
    of the weight; offset = qmin - zero, so w = (q + offset) * scale."""
    quantizer = layer.weight_quantizer
    shape = layer._frozen_shape
    out, reduction = shape[0], layer.weight_codes.numel() // shape[0]
    scale, zero = quantizer.current_params()
    scale = scale.detach().float().reshape(-1)
    zero = torch.zeros_like(scale) if zero is None else zero.detach().float().reshape(-1)
    offset = quantizer.fmt.qmin - zero
    kind = quantizer.grouping.kind
    if kind == "per_tensor":
        return scale.reshape(1, 1, 1), offset.reshape(1, 1, 1), reduction
    if kind == "per_channel":
        return scale.reshape(out, 1, 1), offset.reshape(out, 1, 1), reduction
    size = quantizer.grouping.group_size
    return scale.reshape(out, -1, 1), offset.reshape(out, -1, 1), size


def int4_weight_supported(layer: QuantLayer) -> bool:
    """Frozen integer weights of <= 4 bits, per-tensor, per-output-channel or group-wise, on a layer whose
    input is not quantized (weight-only)."""
    quantizer = layer.weight_quantizer
    if quantizer is None or not layer.frozen or not isinstance(quantizer.fmt, IntFormat):
        return False
    grouping = quantizer.grouping
    if grouping.kind == "per_token" or (grouping.kind == "per_channel" and grouping.axis != 0):
        return False
    input_quantized = layer.input_quantizer is not None and layer.input_quantizer.enabled
    return quantizer.fmt.bits <= 4 and not input_quantized and issubclass(layer.float_type, nn.Linear | nn.Conv2d)


class PackedInt4Layer(nn.Module):
    """Linear or Conv2d with nibble-packed weights decoded at every call into `compute_dtype`."""

    keeps_float32_state = True  # scales stay float32; it returns its input's dtype

    def __init__(self, layer: QuantLayer, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype or default_compute_dtype()
        codes = _code_matrix(layer)
        self.weight_shape = tuple(layer._frozen_shape)
        self.reduction = codes.shape[1]
        self.register_buffer("packed", pack_nibbles(codes))
        scale, offset, self.group_size = _group_params(layer)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.is_conv = issubclass(layer.float_type, nn.Conv2d)
        if self.is_conv:
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    @property
    def kernel(self) -> str:
        name = "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"
        return f"packed int4 weights, decoded per call ({name} {'conv' if self.is_conv else 'GEMM'})"

    def weight(self) -> torch.Tensor:
        """The decoded weight (float32 arithmetic as in the simulation, then one cast)."""
        codes = unpack_nibbles(self.packed, self.reduction).float()
        grouped = codes.reshape(self.weight_shape[0], -1, self.group_size)
        return ((grouped + self.offset) * self.scale).reshape(self.weight_shape).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        if self.is_conv:
            out = F.conv2d(x.to(self.compute_dtype), weight, None, *self.conv_args).float()
            out = out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)
        else:
            out = F.linear(x.to(self.compute_dtype), weight).float()
            out = out if self.bias is None else out + self.bias
        return out.to(x.dtype)  # float32 for the simulation's numerics, bfloat16 in a bfloat16 model


def int4pack_group_size(layer: QuantLayer) -> int | None:
    """The group size `_weight_int4pack_mm_for_cpu` can run this linear with, or None.

    Per-channel (and per-tensor) scales become any kernel group size dividing K, the scale repeated."""
    if not issubclass(layer.float_type, nn.Linear) or not int4_weight_supported(layer):
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or layer.out_features % 16:
        return None
    grouping = layer.weight_quantizer.grouping
    if grouping.kind == "group":
        return grouping.group_size if grouping.group_size in INT4PACK_GROUP_SIZES else None
    return next((size for size in INT4PACK_GROUP_SIZES if layer.in_features % size == 0), None)


class Int4PackMMLinear(nn.Module):
    """Linear on PyTorch's CPU int4 GEMM, which dequantizes w = (q - 8) * s + z' inside the kernel.

    Our mapping w = s * (q + qmin - z) is the same with z' = s * (8 + qmin - z), exactly in real
    arithmetic (tests/test_kernels_int4.py checks it against dequantize-then-matmul)."""

    kernel = "aten::_weight_int4pack_mm_for_cpu"
    keeps_float32_state = True  # scales stay float32; it returns its input's dtype

    def __init__(self, layer: QuantLinear, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        group = int4pack_group_size(layer)
        if group is None:
            raise ValueError("layer is not supported by _weight_int4pack_mm_for_cpu (see int4pack_group_size)")
        self.compute_dtype = compute_dtype or default_compute_dtype()
        self.group_size, self.out_features, self.in_features = group, layer.out_features, layer.in_features
        self.weight_shape = (self.out_features, self.in_features)
        codes = _code_matrix(layer).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scale, offset, _ = _group_params(layer)
        repeat = (self.in_features // group) // scale.shape[1]  # per-channel: one scale per kernel group
        scale = scale.reshape(scale.shape[0], -1).repeat_interleave(repeat, 1).expand(self.out_features, -1)
        offset = offset.reshape(offset.shape[0], -1).repeat_interleave(repeat, 1).expand(self.out_features, -1)
        zeros = (offset + 8) * scale
        self.register_buffer("scale_and_zeros", torch.stack([scale.t(), zeros.t()], dim=-1).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scale_and_zeros.to(self.compute_dtype)
        ).float()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)
