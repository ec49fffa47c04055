"""Quantize a token denoiser with the continuous pillar's methods (naive, ptq4dm, ...) and with weight VQ
(VQ4DiT codebooks, optionally with an LR²VQ low-rank branch).

The methods call `denoiser(sample, timesteps, **conditioning)` on a CalibrationSet; a thin adapter
gives the token denoiser that calling convention, and the calibration set holds token grids recorded
along the full-precision sampler's own trajectories (one entry per network call, CFG branches apart).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.errors import ConfigError
from diffquant.methods import MethodConfig, get_method, make_config
from diffquant.modules import quant_layers
from diffquant.modules.codebook import apply_weight_vq
from diffquant.quant.codebook import CodebookSpec
from diffquant.tokens.denoiser import TokenDenoiser
from diffquant.tokens.samplers import TokenSamplerConfig, sample_tokens


class DenoiserCallAdapter(nn.Module):
    """`(sample, timesteps, class_labels=...) -> (logits,)`, the convention calibration feeds use."""

    def __init__(self, denoiser: TokenDenoiser):
        super().__init__()
        # not named `inner`: adapter_for would look through it to the token denoiser's own signature
        self.token_denoiser = denoiser

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None):
        return (self.token_denoiser(sample, class_labels),)


@torch.no_grad()
def record_token_calibration(
    denoiser: TokenDenoiser, sampler: TokenSamplerConfig, num_samples: int = 256, seed: int = 1
) -> CalibrationSet:
    """Every network input (tokens, labels) of `num_samples` class-balanced full-precision samples."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args):
        calls.append((args[0].clone(), args[1].clone()))

    handle = denoiser.register_forward_pre_hook(hook)
    try:
        labels = torch.arange(num_samples) % denoiser.config.num_classes
        sample_tokens(denoiser, num_samples, sampler, labels, seed=seed)
    finally:
        handle.remove()
    tokens = torch.cat([c[0] for c in calls])
    classes = torch.cat([c[1] for c in calls])
    step = torch.cat([torch.full((len(c[0]),), i) for i, c in enumerate(calls)])
    return CalibrationSet(
        sample=tokens,
        timestep=step.float(),
        step_index=step,
        conditioning={"class_labels": classes},
        num_steps=len(calls),
        meta={"sampler": sampler.sampler, "steps": sampler.steps, "samples": num_samples},
    )


def quantize_token_denoiser(
    denoiser: TokenDenoiser,
    method: str | MethodConfig,
    calibration: CalibrationSet,
    progress: bool = False,
    **options,
) -> TokenDenoiser:
    """A quantized copy of `denoiser` by a registered method: its name with options (e.g. naive at wbits=8,
    abits=8) or a ready config."""
    if isinstance(method, MethodConfig) and options:
        raise ConfigError("Give either a method config or a method name with options, not both.")
    config = method if isinstance(method, MethodConfig) else make_config(method, **options)
    adapter = DenoiserCallAdapter(copy.deepcopy(denoiser))
    get_method(config.name).apply(adapter, calibration, config, progress)
    for _, layer in quant_layers(adapter):
        layer.freeze()
    return adapter.token_denoiser.eval()


def vq_token_denoiser(
    denoiser: TokenDenoiser,
    spec: CodebookSpec = CodebookSpec(),
    calibration: CalibrationSet | None = None,
    pattern: str = r"blocks\..*",
) -> tuple[TokenDenoiser, dict]:
    """A copy whose transformer-block linears are VQ4DiT-style codebook weights (head and embeddings stay).

    `CodebookSpec(rank=r)` gives each of them a float16 rank-r SVD branch beside the codebook (LR²VQ).
    """
    model = copy.deepcopy(denoiser)

    def run() -> None:
        for batch in calibration.batches(256):
            model(batch.sample, batch.conditioning["class_labels"])

    report = apply_weight_vq(model, spec, pattern, run if calibration is not None else None)
    return model.eval(), report
