"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down.

The soft rounding offset is the rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
with gamma = -0.1, zeta = 1.1. The regulariser sum(1 - |2h - 1|^beta) pushes h to {0, 1} as beta
anneals from 20 to 2 after a 20 % warm-up, as in BRECQ and Q-Diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffquant.quant.formats import IntFormat

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_alpha(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """alpha such that h(alpha) equals the fractional part of x / scale (start at nearest-or-floor)."""
    fraction = x / scale - torch.floor(x / scale)
    return -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1.0)


def adaround_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat, alpha: torch.Tensor, soft: bool
) -> torch.Tensor:
    """s * (clamp(floor(x / s) + h + z, qmin, qmax) - z) with h soft (training) or hard (h >= 0.5)."""
    offset = rectified_sigmoid(alpha) if soft else (alpha >= 0).to(x.dtype)
    codes = torch.clamp(torch.floor(x / scale) + offset + zero_point, fmt.qmin, fmt.qmax)
    return (codes - zero_point) * scale


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * rectified_sigmoid(alpha) - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class TemperatureDecay:
    """beta: `start` during the first `warmup` share of `iterations`, then linear down to `end`."""

    iterations: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, iteration: int) -> float:
        begin = self.warmup * self.iterations
        if iteration < begin:
            return self.start
        progress = (iteration - begin) / max(1.0, self.iterations - begin)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress)


class AdaRoundState(nn.Module):
    """The learnable rounding variables of one weight tensor (in the quantizer's grouped view)."""

    def __init__(self, view: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.alpha = nn.Parameter(initial_alpha(view.detach(), scale.detach()))
        self.soft = True

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.alpha, beta)
