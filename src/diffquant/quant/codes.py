"""Unsigned integer codes for every format, so any quantized tensor can be bit-packed.

Integer formats store `q - qmin`; float formats store their IEEE-style bit pattern
(sign | exponent | mantissa); binary stores the sign bit. `from_codes(to_codes(x))` reproduces the
fake-quantized values exactly.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats import BinaryFormat, FloatFormat, IntFormat, NumberFormat, ScaledFloatFormat
from diffquant.quant.functional import float_round, int_codes


def float_to_bits(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit patterns of values that already lie on `fmt`'s grid."""
    sign = (torch.signbit(values)).to(torch.int64)
    magnitude = values.abs().double()
    min_normal = 2.0**fmt.min_normal_exponent
    subnormal = magnitude < min_normal
    exponent = torch.floor(torch.log2(magnitude.clamp_min(min_normal)))
    mantissa_scale = 2.0**fmt.mantissa_bits
    normal_mantissa = torch.round((magnitude / torch.exp2(exponent) - 1.0) * mantissa_scale)
    subnormal_mantissa = torch.round(magnitude / fmt.smallest_subnormal)
    exponent_field = torch.where(subnormal, torch.zeros_like(exponent), exponent + fmt.exponent_bias)
    mantissa = torch.where(subnormal, subnormal_mantissa, normal_mantissa)
    body = (exponent_field.to(torch.int64) << fmt.mantissa_bits) | mantissa.to(torch.int64)
    return (sign << (fmt.exponent_bits + fmt.mantissa_bits)) | body


def bits_to_float(bits: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    bits = bits.to(torch.int64)
    mantissa = (bits & (2**fmt.mantissa_bits - 1)).double()
    exponent_field = (bits >> fmt.mantissa_bits) & (2**fmt.exponent_bits - 1)
    sign = (bits >> (fmt.exponent_bits + fmt.mantissa_bits)) & 1
    fraction = mantissa / 2.0**fmt.mantissa_bits
    normal = torch.exp2((exponent_field - fmt.exponent_bias).double()) * (1.0 + fraction)
    subnormal = 2.0**fmt.min_normal_exponent * fraction
    magnitude = torch.where(exponent_field == 0, subnormal, normal)
    return torch.where(sign == 1, -magnitude, magnitude).float()


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat) -> torch.Tensor:
    """Unsigned int64 codes of `x` (scales broadcast against `x`)."""
    if isinstance(fmt, ScaledFloatFormat):  # element codes; the block scales are stored beside them
        fmt = fmt.element
    if isinstance(fmt, IntFormat):
        zero_point = torch.zeros_like(scale) if zero_point is None else zero_point
        return (int_codes(x, scale, zero_point, fmt) - fmt.qmin).to(torch.int64)
    if isinstance(fmt, FloatFormat):
        return float_to_bits(float_round(x / scale, fmt), fmt)
    return (x >= 0).to(torch.int64)


def from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat
) -> torch.Tensor:
    """Dequantized float32 values of unsigned codes."""
    if isinstance(fmt, ScaledFloatFormat):
        fmt = fmt.element
    if isinstance(fmt, IntFormat):
        zero_point = torch.zeros_like(scale) if zero_point is None else zero_point
        return ((codes.to(torch.float32) + fmt.qmin) - zero_point) * scale
    if isinstance(fmt, FloatFormat):
        return bits_to_float(codes, fmt) * scale
    assert isinstance(fmt, BinaryFormat)
    return torch.where(codes.bool(), scale, -scale)
