"""Quantize-dequantize on plain tensors with straight-through gradients.

All functions take `x` and scales that broadcast against it (in diffquant, the (G, n) grouped view
and (G, 1) scales). The rounding uses a straight-through estimator, so the gradient with respect to
the scale is the LSQ gradient (Esser et al. 2020) and the gradient with respect to `x` is the
identity inside the clipping range.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats import BinaryFormat, FloatFormat, IntFormat, NumberFormat

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


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat
) -> torch.Tensor:
    """Dispatch on the format."""
    if isinstance(fmt, IntFormat):
        return fake_quantize_int(x, scale, zero_point if zero_point is not None else torch.zeros_like(scale), fmt)
    if isinstance(fmt, FloatFormat):
        return fake_quantize_float(x, scale, fmt)
    return fake_quantize_binary(x, scale)


def params_from_range(
    low: torch.Tensor, high: torch.Tensor, fmt: NumberFormat, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map [low, high] (per group) onto the format's grid.

    Symmetric integer grids and float grids use the absolute maximum with zero-point 0; affine
    integer grids stretch [min(low, 0), max(high, 0)] over all codes so zero stays exact.
    """
    low, high = low.float(), high.float()
    if isinstance(fmt, BinaryFormat):
        raise ValueError("binary scales come from the mean magnitude, not a range")
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
