"""Quantize-dequantize on plain tensors with straight-through gradients.

All functions take `x` and scales that broadcast against it (in diffquant, the (G, n) grouped view
and (G, 1) scales). The rounding uses a straight-through estimator, so the gradient with respect to
the scale is the LSQ gradient (Esser et al. 2020) and the gradient with respect to `x` is the
identity inside the clipping range.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats import (
    NAMED_FLOAT_FORMATS,
    BinaryFormat,
    FloatFormat,
    IntFormat,
    LogFormat,
    NumberFormat,
    ScaledFloatFormat,
)

MIN_SCALE = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) in the forward pass, identity in the backward pass."""
    return (torch.round(x) - x).detach() + x


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` in the forward pass; its gradient multiplied by `factor` in the backward pass (LSQ's g)."""
    return (x - x * factor).detach() + x * factor


def int_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Integer codes clamp(round(x / s) + z, qmin, qmax), as float tensors holding integers."""
    return torch.clamp(torch.round(x / scale) + zero_point, fmt.qmin, fmt.qmax)


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s with STE rounding (LSQ when `scale` is learnable)."""
    codes = torch.clamp(round_ste(x / scale) + zero_point, fmt.qmin, fmt.qmax)
    return (codes - zero_point) * scale


def float_round(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round to the nearest value of `fmt` (half to even), saturating at +-max_value."""
    magnitude = x.abs().clamp(max=fmt.max_value)
    exponent = torch.floor(torch.log2(magnitude.clamp_min(torch.finfo(x.dtype).tiny)))
    exponent = exponent.clamp(min=fmt.min_normal_exponent)  # subnormals share the smallest normal spacing
    spacing = torch.exp2(exponent - fmt.mantissa_bits)
    rounded = torch.round(magnitude / spacing) * spacing
    return torch.copysign(rounded.clamp(max=fmt.max_value), x)


def fake_quantize_float(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """s * round_fmt(x / s) with a straight-through gradient."""
    scaled = x / scale
    return ((float_round(scaled, fmt) - scaled).detach() + scaled) * scale


def fake_quantize_binary(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """+-s with the clipped straight-through gradient of sign (identity where |x| <= s)."""
    hard = torch.where(x >= 0, scale, -scale)
    soft = torch.clamp(x, -scale, scale)
    return (hard - soft).detach() + soft


def log2_codes(x: torch.Tensor, scale: torch.Tensor, fmt: LogFormat) -> torch.Tensor:
    """q = clamp(round(-log2(x / s)), 0, 2^b - 1); zeros and negatives take the smallest level (DGQ eq. 6)."""
    ratio = (x / scale).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(-torch.log2(ratio)), 0, fmt.levels - 1)


def fake_quantize_log2(x: torch.Tensor, scale: torch.Tensor, fmt: LogFormat) -> torch.Tensor:
    """s * 2^-q with a straight-through gradient."""
    hard = scale * torch.exp2(-log2_codes(x.detach(), scale, fmt))
    return (hard - x).detach() + x


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat
) -> torch.Tensor:
    """Dispatch on the format (a block-scaled float rounds its elements with the decoded block scale)."""
    if isinstance(fmt, ScaledFloatFormat):
        fmt = fmt.element
    if isinstance(fmt, IntFormat):
        return fake_quantize_int(x, scale, zero_point if zero_point is not None else torch.zeros_like(scale), fmt)
    if isinstance(fmt, FloatFormat):
        return fake_quantize_float(x, scale, fmt)
    if isinstance(fmt, LogFormat):
        return fake_quantize_log2(x, scale, fmt)
    return fake_quantize_binary(x, scale)


def params_from_range(
    low: torch.Tensor, high: torch.Tensor, fmt: NumberFormat, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map [low, high] (per group) onto the format's grid.

    Symmetric integer grids and float grids use the absolute maximum with zero-point 0; affine
    integer grids stretch [min(low, 0), max(high, 0)] over all codes so zero stays exact.
    """
    low, high = low.float(), high.float()
    if isinstance(fmt, ScaledFloatFormat):
        absmax = torch.maximum(low.abs(), high.abs())
        return block_scales(absmax, fmt), torch.zeros_like(absmax)
    if isinstance(fmt, BinaryFormat):
        raise ValueError("binary scales come from the mean magnitude, not a range")
    if isinstance(fmt, LogFormat):  # the top level 2^0 sits at the largest magnitude
        absmax = torch.maximum(low.abs(), high.abs())
        return absmax.clamp_min(MIN_SCALE), torch.zeros_like(absmax)
    if isinstance(fmt, FloatFormat):
        absmax = torch.maximum(low.abs(), high.abs())
        return (absmax / fmt.max_value).clamp_min(MIN_SCALE), torch.zeros_like(absmax)
    if symmetric:
        if fmt.signed:
            positive_levels = max(fmt.qmax, 1)
            absmax = torch.maximum(low.abs(), high.abs())
            return (absmax / positive_levels).clamp_min(MIN_SCALE), torch.zeros_like(absmax)
        return (high.clamp_min(0) / fmt.qmax).clamp_min(MIN_SCALE), torch.zeros_like(high)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / (fmt.qmax - fmt.qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(fmt.qmin - torch.round(low / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point


E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127  # OCP MX v1.0: codes 0..254 = 2^(code-127), 255 = NaN


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) for positive finite x (from the binary exponent, no log rounding)."""
    _, exponent = torch.frexp(x)
    return (exponent - 1).to(x.dtype)


def nvfp4_tensor_scale(absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor fp32 scale: amax / (6 * 448), so the largest block scale is E4M3's max."""
    top = absmax.max()
    e4m3 = NAMED_FLOAT_FORMATS["e4m3"]
    scale = top / (6.0 * e4m3.max_value)
    return torch.where(top > 0, scale, torch.ones_like(scale))


def block_scales(absmax: torch.Tensor, fmt: ScaledFloatFormat) -> torch.Tensor:
    """Decoded per-block scales of a block-scaled float format from each block's absolute maximum.

    MX (OCP v1.0, sec. 6.3): X = 2^(floor(log2(amax)) - emax_elem), clamped to E8M0's range; an all-zero
    block gets the smallest scale 2^-127. NVFP4: s = round_e4m3(amax / 6 / t) * t with t the tensor scale;
    a block scale that would round to zero becomes E4M3's smallest subnormal (its values then still
    round to the nearest representable number instead of all to zero).
    """
    absmax = absmax.float()
    if fmt.scale_encoding == "e8m0":
        exponent = floor_log2(absmax.clamp_min(2.0**E8M0_MIN_EXPONENT)) - fmt.element.max_exponent
        exponent = torch.where(absmax > 0, exponent, torch.full_like(exponent, E8M0_MIN_EXPONENT))
        return torch.exp2(exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT))
    e4m3 = NAMED_FLOAT_FORMATS["e4m3"]
    tensor_scale = nvfp4_tensor_scale(absmax)
    encoded = float_round(absmax / fmt.element.max_value / tensor_scale, e4m3).clamp_min(e4m3.smallest_subnormal)
    return encoded * tensor_scale
