"""EDA-DM's temporal distribution alignment calibration (TDAC): how many samples each step gets.

Run the full-precision sampler on a probe batch and record a mid-network feature F_t at every step.
Density D_t counts the other steps s with MSE(F_t, F_s) <= r; variety V_t = sum_s (1 - cos(F_t, F_s)).
Both are min-max normalised, w_t = D_t + lambda * V_t, and step t gets round(N w_t / sum w) samples
(the rounding remainder goes to the largest weights).
"""

from __future__ import annotations

import torch

from diffquant.calibration.policies import AllocatedSteps
from diffquant.errors import ConfigError
from diffquant.model import DiffusionModel
from diffquant.sampling import SamplerConfig, sample


def default_feature_module(denoiser: torch.nn.Module) -> str:
    """The mid-block attention of a UNet, else the middle transformer block."""
    names = [name for name, _ in denoiser.named_modules()]
    for name in names:
        if name.startswith("mid_block.attentions.") and name.count(".") == 2:
            return name
    blocks = [n for n in names if n.startswith("transformer_blocks.") and n.count(".") == 1]
    if blocks:
        return blocks[len(blocks) // 2]
    raise ConfigError("Cannot find a mid-network feature for TDAC; set calibration.tdac_feature_module.")


def step_features(model: DiffusionModel, sampler: SamplerConfig, module_name: str, probes: int, seed: int):
    """Feature of `module_name` at every sampling step for `probes` trajectories: (steps, probes, ...)."""
    module = model.denoiser.get_submodule(module_name)
    features: list[torch.Tensor] = []

    def hook(_module, _args, output):
        value = output[0] if isinstance(output, tuple) else output
        features.append(value.detach()[:probes].reshape(probes, -1).clone())

    handle = module.register_forward_hook(hook)
    try:
        sample(model, probes, sampler, seed=seed, batch_size=probes, progress=False)
    finally:
        handle.remove()
    return torch.stack(features)


def tdac_counts(features: torch.Tensor, total: int, lam: float = 1.2, radius: float | None = None) -> tuple[int, ...]:
    """Samples per step from per-step features (steps, probes, dim)."""
    steps = features.shape[0]
    flat = features.reshape(steps, -1).double()
    mse = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    if radius is None:  # r is dataset-specific in the paper (3.0 CIFAR, 0.3 Bedroom): default to the median
        off_diagonal = mse[~torch.eye(steps, dtype=torch.bool)]
        radius = float(off_diagonal.median())
    density = (mse <= radius).sum(1).double() - 1.0
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    variety = (1.0 - unit @ unit.T).sum(1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else torch.ones_like(x)

    weights = normalise(density) + lam * normalise(variety)
    weights = weights.clamp_min(1e-6)
    exact = total * weights / weights.sum()
    counts = torch.floor(exact).long()
    remainder = total - int(counts.sum())
    counts[torch.argsort(exact - counts, descending=True)[:remainder]] += 1
    return tuple(int(c) for c in counts)


def tdac_policy(
    model: DiffusionModel,
    sampler: SamplerConfig,
    total: int,
    lam: float = 1.2,
    radius: float | None = None,
    feature_module: str | None = None,
    probes: int = 16,
    seed: int = 4321,
) -> AllocatedSteps:
    module_name = feature_module or default_feature_module(model.denoiser)
    features = step_features(model, sampler, module_name, probes, seed)
    return AllocatedSteps(tdac_counts(features, total, lam, radius))
