"""Agreement between two models' samples from the same seeds: PSNR and SSIM on [0, 1] pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffquant.errors import DiffquantError


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise DiffquantError(f"Compare two (N, C, H, W) sets of one shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    # samples live in [-1, 1]; the metrics use the usual [0, 1] range
    return ((a.double() + 1) / 2).clamp(0, 1), ((b.double() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB between image sets in [-1, 1] (identical images give `max_db`)."""
    a, b = _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    return kernel[:, None] * kernel[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, K1=0.01, K2=0.03) for sets in [-1, 1].

    A 7-pixel window suits 28x28 images; channels are averaged.
    """
    a, b = _check_pair(a, b)
    channels = a.shape[1]
    kernel = _gaussian_window(window, sigma).to(a)[None, None].repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1).float()
