"""Smoothing (SmoothQuant, Xiao et al. 2023; SVDQuant's per-layer search): move activation outliers
into the weights with per-input-channel scales s_j = max|X_j|^a / max|W_j|^(1-a).

The input is divided by s and the weight's input channels multiplied by it, so the float output does
not change; `search_smoothing` picks a on a grid (plus no smoothing) by the layer's output error with
every quantizer and the low-rank branch active, as SVDQuant's `calib/smooth.py` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError
from diffquant.modules.lowrank import LowRankQuantLayer

MIN_RANGE = 1e-5


def channel_absmax(x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """max |x| per channel (over every other axis)."""
    return x.detach().abs().movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1).amax(1).float()


def weight_channel_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |W| per input channel (axis 1 of a linear or conv weight)."""
    return channel_absmax(weight, 1)


def smoothing_scales(activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha), normalised to geometric mean 1 (the output is unchanged
    either way; normalising keeps both operands near their original magnitude)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"Smoothing alpha must lie in [0, 1], got {alpha}.")
    act = activation_absmax.float().clamp_min(MIN_RANGE)
    weight = weight_absmax.float().clamp_min(MIN_RANGE)
    scales = act.pow(alpha) / weight.pow(1.0 - alpha)
    return (scales / scales.log().mean().exp()).clamp_min(MIN_RANGE)


@dataclass(frozen=True)
class SmoothingResult:
    alpha: float | None
    """The chosen alpha; None when no smoothing won."""
    error: float
    baseline_error: float
    """Output error without smoothing (same rank, same quantizers)."""


def layer_output_error(layer: LowRankQuantLayer, inputs: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(inputs) - target).pow(2).mean())


def search_smoothing(
    layer: LowRankQuantLayer,
    weight: torch.Tensor,
    inputs: torch.Tensor,
    target: torch.Tensor,
    activation_absmax: torch.Tensor,
    alphas: tuple[float, ...],
    rank: int | None = None,
) -> SmoothingResult:
    """Try every alpha (and s = 1) on `inputs`, keep the one with the smallest output MSE against
    `target` (the float layer's output), and leave `layer` decomposed with it."""
    ones = torch.ones_like(activation_absmax, dtype=torch.float32)
    layer.decompose(weight, ones, rank)
    baseline = layer_output_error(layer, inputs, target)
    best_alpha, best_error = None, baseline
    weight_absmax = weight_channel_absmax(weight)
    for alpha in alphas:
        layer.decompose(weight, smoothing_scales(activation_absmax, weight_absmax, alpha), rank)
        error = layer_output_error(layer, inputs, target)
        if error < best_error:
            best_alpha, best_error = alpha, error
    chosen = ones if best_alpha is None else smoothing_scales(activation_absmax, weight_absmax, best_alpha)
    layer.decompose(weight, chosen, rank)
    return SmoothingResult(best_alpha, best_error, baseline)
