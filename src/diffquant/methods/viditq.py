"""ViDiT-Q (Zhao et al., ICLR 2025): dynamic fine-grained activations, static-dynamic channel balancing and
metric-decoupled mixed precision for diffusion transformers (and here any denoiser).

Algorithm (`paper` preset: the released W4A8 mixed-precision recipe; `fast` for CPUs):
  1. keep the embedders and the final layer in float: the first and last layers and every layer whose
     input depends only on the timestep or conditioning (x/t/y embedders, adaLN modulation);
  2. weights: one scale per output channel, min-max, round to nearest; activations: dynamic per-token
     asymmetric min-max computed online at every call (no clipping, no per-step or per-CFG ranges);
  3. static-dynamic channel balancing per layer: the static part scales channels, x/s and W diag(s) with
     s = max|X|^a / max|W|^(1-a) (max|X| an EMA over the calibration batches, momentum 0.95); the
     dynamic part then rotates the scaled input and weight by a Hadamard matrix, x' = (x/s) H and
     W' = W diag(s) H, which spreads the outliers that move from channel to channel over time;
  4. metric-decoupled mixed precision: every layer's weights are quantized alone at each candidate
     width; layers that carry the text (cross-attention, text-stream layers) are scored by a content
     metric (1 - SSIM of the output), the others by a quality metric (noise-to-signal power); costs are
     normalised per metric and an integer program (engines.allocation) picks each layer's width under
     an average budget of wbits + `extra_average_bits` bits per weight.
Parameters do not depend on the sampling step. Activation bits stay uniform (the paper's W4A8-MP plan
keeps 8-bit activations); attention matmuls stay in float.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from diffquant.calibration import CalibrationSet, call_denoiser, feed_calibration
from diffquant.calibration.dataset import random_subset
from diffquant.calibration.validation import TEXT_CONDITIONING
from diffquant.engines.allocation import Allocation, allocate_bits, budget_for_average_bits
from diffquant.engines.sensitivity import (
    CONTENT,
    QUALITY,
    decoupled_costs,
    edge_and_embedder_layers,
    requantize_weight,
    weight_sensitivity,
)
from diffquant.engines.smoothing import channel_absmax, smoothing_scales, weight_channel_absmax
from diffquant.errors import ConfigError
from diffquant.methods.base import CalibrationConfig, MethodConfig
from diffquant.methods.registry import register_method
from diffquant.modules import LowRankQuantLayer, apply_plans, resolve_policy
from diffquant.modules.policy import pattern_matches
from diffquant.modules.structure import text_stream_layers
from diffquant.quant import QuantSpec

CROSS_ATTENTION_PATTERNS = ("*attn2*", "*cross_attn*")
"""Cross-attention by name (diffusers' BasicTransformerBlock, PixArt); text-stream layers are found by running."""


@dataclass
class ViDiTQConfig(MethodConfig):
    name = "viditq"
    PRESETS = {
        "paper": {"calibration": {"trajectories": 32, "policy": "uniform", "uniform_steps": 19}},
        "fast": {
            "calibration_samples": 64,
            "sensitivity_samples": 8,
            "calibration": {"trajectories": 16, "policy": "uniform", "uniform_steps": 8},
        },
    }
    wbits: int = 4
    abits: int | None = 8
    alpha: float = 0.01
    """Migration strength a of s = max|X|^a / max|W|^(1-a). The released W4A8-MP config sets 0.99 on the
    weight side of its mask max|W|^0.99 / max|X|^0.01, which is a = 0.01 here."""
    activation_max_momentum: float = 0.95
    """EMA momentum of the per-channel activation maxima over the calibration batches."""
    rotate: bool = True
    """The dynamic half of channel balancing: Hadamard-rotate each layer's scaled input and weight."""
    mixed_precision: bool = True
    """Metric-decoupled mixed-precision weight widths (ViDiT-Q-MP); False keeps every layer at wbits."""
    weight_bit_choices: tuple[int, ...] = (4, 6, 8)
    """Candidate weight widths of the allocator (the paper's {4, 6, 8})."""
    extra_average_bits: float = 0.25
    """Average bits per weight above wbits the allocator may spend raising the most sensitive layers."""
    calibration_samples: int = 256
    """Calibration entries whose inputs give the per-channel activation maxima."""
    sensitivity_samples: int = 16
    """Calibration entries the sensitivity probe runs the model on, per layer and width."""
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(trajectories=32, policy="uniform", uniform_steps=19)
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"viditq: alpha must lie in [0, 1], got {self.alpha}.")
        if not 0.0 <= self.activation_max_momentum < 1.0:
            raise ConfigError("viditq: activation_max_momentum must lie in [0, 1).")
        if not self.weight_bit_choices or any(not 1 <= b <= 16 for b in self.weight_bit_choices):
            raise ConfigError(f"viditq: weight_bit_choices must be widths in 1-16, got {self.weight_bit_choices}.")
        if self.extra_average_bits < 0 or self.calibration_samples <= 0 or self.sensitivity_samples <= 0:
            raise ConfigError("viditq: extra_average_bits must be >= 0 and the sample counts positive.")

    def activation_spec(self) -> QuantSpec | None:
        if self.weight_only:
            return None
        return QuantSpec(
            self.activation_format or f"int{self.abits}", symmetric=False, granularity="per_token", dynamic=True
        )


def float_layers(denoiser: nn.Module, calibration: CalibrationSet) -> list[str]:
    """Embedders and final layer: the first and last layers and those fed only timestep/conditioning."""
    return edge_and_embedder_layers(denoiser, next(calibration.batches(4)))


def content_layers(denoiser: nn.Module, calibration: CalibrationSet, names: list[str]) -> set[str]:
    """Layers scored by the content metric: cross-attention by name, and the text stream where there is text."""
    content = {n for n in names if any(pattern_matches(p, n) for p in CROSS_ATTENTION_PATTERNS)}
    text = calibration.conditioning.get(TEXT_CONDITIONING)
    if torch.is_tensor(text) and text.ndim == 3:
        batch = next(calibration.batches(2))
        content |= set(text_stream_layers(denoiser, lambda: call_denoiser(denoiser, batch), text.shape[1]))
    return content & set(names)


def activation_maxima(
    denoiser: nn.Module, modules: dict[str, nn.Module], data: CalibrationSet, config: ViDiTQConfig, progress: bool
) -> dict[str, torch.Tensor]:
    """Per layer, the EMA over calibration batches of each input channel's max |x|."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module):
        def grab(_module, args):
            x = args[0].detach()
            amax = channel_absmax(x, 1 if isinstance(module, nn.Conv2d) else x.ndim - 1)
            momentum = config.activation_max_momentum
            maxima[name] = amax if name not in maxima else momentum * maxima[name] + (1 - momentum) * amax

        return grab

    handles = [module.register_forward_pre_hook(hook(name, module)) for name, module in modules.items()]
    try:
        feed_calibration(denoiser, data, config.batch_size, "viditq: channel maxima", progress)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


@register_method(
    ViDiTQConfig,
    summary="ViDiT-Q: dynamic per-token activations, scaling + rotation balancing, metric-decoupled MP (ICLR 2025)",
)
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: ViDiTQConfig, progress: bool = True) -> dict:
    kept = float_layers(denoiser, calibration)
    policy = config.layer_policy()
    policy = replace(policy, keep_fp=tuple(dict.fromkeys((*policy.keep_fp, *kept))))
    plans, attention = resolve_policy(denoiser, policy)
    originals = {name: denoiser.get_submodule(name) for name in plans}
    weights = {name: module.weight.detach().clone() for name, module in originals.items()}
    content = content_layers(denoiser, calibration, list(plans))
    maxima = activation_maxima(
        denoiser, originals, random_subset(calibration, config.calibration_samples, 0), config, progress
    )

    # static-dynamic channel balancing: scale, then rotate (a rank-0 smoothed layer holds both)
    apply_plans(
        denoiser, {n: replace(p, lowrank={"rank": 0, "rotate": config.rotate}) for n, p in plans.items()}, attention
    )
    layers: dict[str, LowRankQuantLayer] = {name: denoiser.get_submodule(name) for name in plans}
    for name, layer in layers.items():
        layer.decompose(
            weights[name], smoothing_scales(maxima[name], weight_channel_absmax(weights[name]), config.alpha)
        )

    details: dict = {"kept_fp": kept, "balanced_layers": len(layers), "rotated": config.rotate}
    residuals = {name: layer.residual for name, layer in layers.items() if layer.residual.weight_quantizer is not None}
    if config.mixed_precision and residuals:
        metric_of = {name: CONTENT if name in content else QUALITY for name in residuals}
        sizes = {name: weights[name].numel() for name in residuals}
        budget = budget_for_average_bits(sizes, config.wbits + config.extra_average_bits)
        widest = max(config.weight_bit_choices)
        if budget >= widest * sum(sizes.values()):  # every layer fits the widest choice: nothing to measure
            allocation = Allocation({name: widest for name in residuals}, 0.0, widest * sum(sizes.values()))
        else:
            probe = list(random_subset(calibration, config.sensitivity_samples, 1).batches(config.batch_size))
            sensitivity = weight_sensitivity(denoiser, residuals, tuple(config.weight_bit_choices), metric_of, probe)
            allocation = allocate_bits(decoupled_costs(sensitivity, metric_of), sizes, budget)
        for name, bits in allocation.bits.items():
            requantize_weight(residuals[name], bits)
        details.update(
            weight_bits=allocation.bits,
            average_weight_bits=round(allocation.total_bits / sum(sizes.values()), 4),
            budget_bits=budget,
            content_layers=sorted(n for n in residuals if metric_of[n] == CONTENT),
        )
    return details
