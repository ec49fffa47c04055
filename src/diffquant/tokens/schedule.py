"""Discrete forward processes: absorbing (mask) schedules and VQ-Diffusion's mask-and-replace chain.

VQ-Diffusion (Gu et al. 2022, Sec. 3.2): one step keeps a token with prob alpha_t + beta_t, moves it to
each of the K codes with prob beta_t, or masks it with prob gamma_t. The cumulative chain has the closed
form abar_t = prod alpha, 1 - gammabar_t = prod (1 - gamma), betabar_t = (1 - abar_t - gammabar_t) / K.
All buffers are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError


def cosine_mask_ratio(r: torch.Tensor | float) -> torch.Tensor:
    """MaskGIT's gamma(r) = cos(pi r / 2): fraction of tokens still masked at progress r in [0, 1]."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float64) * math.pi / 2)


@dataclass(frozen=True)
class MaskReplaceSchedule:
    """Cumulative mask and replace probabilities, linear in t from 0 at t=0 to the end values at t=T.

    Presets: "mask_and_replace" (mask 0.9, replace 0.1 at T, the paper's budget) and "vqdiffusion_code"
    (the released checkpoints' schedule, absorbing in practice: replace mass 1e-6).
    """

    steps: int = 100
    mask_end: float = 0.9
    replace_end: float = 0.1
    abar_floor: float = 1e-6  # keep abar_T > 0 so log-space algebra stays finite

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.mask_end + self.replace_end > 1.0 or min(self.mask_end, self.replace_end) < 0:
            raise ConfigError("mask_end + replace_end must be <= 1 and both >= 0.")

    @classmethod
    def preset(cls, name: str, steps: int = 100) -> MaskReplaceSchedule:
        if name == "mask_and_replace":
            return cls(steps, 0.9, 0.1)
        if name == "vqdiffusion_code":
            return cls(steps, 0.99999, 1e-6)
        raise ConfigError(f"Unknown schedule preset '{name}': use mask_and_replace or vqdiffusion_code.")

    def cumulative(self, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(abar, betabar, gammabar) for t = 0..T, float64, with abar_0 = 1."""
        self.validate()
        s = torch.linspace(0, 1, self.steps + 1, dtype=torch.float64)
        gammabar = s * self.mask_end
        replace = s * self.replace_end
        abar = (1 - gammabar - replace).clamp_min(self.abar_floor)
        abar[0] = 1.0
        betabar = (1 - abar - gammabar) / codebook_size
        return abar, betabar, gammabar

    def jump(self, codebook_size: int, s: int, t: int) -> tuple[float, float, float]:
        """(alpha, beta, gamma) of the composite transition from step s to step t > s."""
        abar, _, gammabar = self.cumulative(codebook_size)
        alpha = float(abar[t] / abar[s])
        keep = float((1 - gammabar[t]) / (1 - gammabar[s]))
        return alpha, (keep - alpha) / codebook_size, 1 - keep

    def transition_matrix(self, codebook_size: int, s: int, t: int) -> torch.Tensor:
        """Explicit (K+1)x(K+1) matrix Q[i, j] = q(x_t = j | x_s = i) (mask = last); for tests only."""
        alpha, beta, gamma = self.jump(codebook_size, s, t)
        k = codebook_size
        q = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        q[:k, :k] = alpha * torch.eye(k, dtype=torch.float64) + beta
        q[:k, k] = gamma
        q[k, k] = 1.0
        return q

    def marginal(self, x0: torch.Tensor, t: torch.Tensor, codebook_size: int) -> torch.Tensor:
        """q(x_t | x0) as (..., K+1) probabilities for integer x0 and per-element step t."""
        abar, betabar, gammabar = (v[t] for v in self.cumulative(codebook_size))
        probs = betabar[..., None].expand(*x0.shape, codebook_size).clone()
        probs.scatter_add_(-1, x0[..., None], abar[..., None].expand(*x0.shape, 1).clone())
        return torch.cat([probs, gammabar[..., None].expand(*x0.shape, 1)], -1)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, codebook_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) for tokens x0 (B, N) and steps t (B,); the mask token is `codebook_size`."""
        k = codebook_size
        abar, _, gammabar = self.cumulative(k)
        a = abar[t][:, None]
        g = gammabar[t][:, None]
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64)
        random_code = torch.randint(0, k, x0.shape, generator=generator)
        # u < gammabar: mask; next (1 - abar - gammabar): a uniform code (K betabar, may hit x0); else keep
        out = torch.where(u < 1 - a, random_code, x0)
        return torch.where(u < g, torch.full_like(x0, k), out)


def vq_posterior(p_x0: torch.Tensor, x_t: torch.Tensor, schedule: MaskReplaceSchedule, t: int, s: int) -> torch.Tensor:
    """p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for s < t, as (B, N, K+1) float64 probabilities.

    The x0-parameterisation makes any jump s < t legal (VQ-Diffusion's fast inference / step skipping).
    """
    k = p_x0.shape[-1]
    abar, betabar, gammabar = schedule.cumulative(k)
    alpha_st, beta_st, gamma_st = schedule.jump(k, s, t) if s < t else (1.0, 0.0, 0.0)
    p = p_x0.double()
    masked = x_t == k
    out = torch.zeros(*x_t.shape, k + 1, dtype=torch.float64)
    # x_t = mask: codes get gamma_{s->t} q(x_s = k | x0) / gammabar_t, the mask keeps gammabar_s / gammabar_t
    if masked.any():
        pm = p[masked]
        out_m = (
            torch.cat(
                [
                    gamma_st * (abar[s] * pm + betabar[s]),
                    torch.full((pm.shape[0], 1), float(gammabar[s]), dtype=torch.float64),
                ],
                -1,
            )
            / gammabar[t]
        )
        out[masked] = out_m
    # x_t = j < K: weight w(x0) = p(x0) / q(x_t = j | x0), then through q(x_s | x0) and q(x_t = j | x_s)
    visible = ~masked
    if visible.any():
        j = x_t[visible]
        pv = p[visible]
        onehot = torch.nn.functional.one_hot(j, k).double()
        w = pv / (betabar[t] + abar[t] * onehot)
        through = abar[s] * w + betabar[s] * w.sum(-1, keepdim=True)
        codes = (alpha_st * onehot + beta_st) * through
        out[visible] = torch.cat([codes, torch.zeros(codes.shape[0], 1, dtype=torch.float64)], -1)
    return out / out.sum(-1, keepdim=True)
