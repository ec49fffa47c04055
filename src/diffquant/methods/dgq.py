"""DGQ (Ryu et al., ICLR 2025): distribution-aware group quantization for text-to-image diffusion models.

Algorithm (`paper` preset: G = 8 groups, ranges per sampling step, the SDXL-Turbo setting; `paper-sd`:
the SD v1.4 setting with BRECQ; `fast` and `reconstructed` for CPUs):
  1. weights: one scale per output channel, min-max, round to nearest (the paper's SDXL-Turbo setting);
     with `reconstruct` (its SD v1.4 setting) the rounding is then learned block by block, BRECQ as
     Q-Diffusion forks it (AdaRound, activation quantization off), before the activation ranges;
  2. outlier-preserving group activation quantization: record every layer input's per-channel and
     per-token min/max over the calibration set, pick the dimension whose ranges spread more
     (D_d = range of the maxima + range of the minima), cluster that dimension's (min, max) pairs by
     k-means into G groups and give each group its own scale and zero-point (the cluster's min and max),
     one set per sampling step; outlier channels land in their own groups instead of stretching the
     grid of all others;
  3. BOS exclusion: in the layers fed the text stream, the BOS (<start>) token passes through in float
     and stays out of the ranges (grouping there runs over channels);
  4. attention-aware quantization: post-softmax probabilities on a base-2 log grid with abits bits,
     x_q = clamp(round(-log2(x / s)), 0, 2^b - 1), whose scale s is the largest probability outside the
     BOS column, computed per prompt at run time; the BOS column itself stays float.
Only for text-conditioned models: without a text input, one clear error says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from diffquant.calibration import CalibrationSet, feed_calibration
from diffquant.calibration.dataset import random_subset
from diffquant.calibration.validation import text_token_count
from diffquant.engines import calibrate_ranges, discover_units, probe
from diffquant.engines.text_stream import text_layers
from diffquant.errors import ConfigError
from diffquant.methods.base import CalibrationConfig
from diffquant.methods.reconstruction_base import (
    ReconstructionMethodConfig,
    finish_reconstruction,
    full_precision_copy,
    start_reconstruction,
)
from diffquant.methods.registry import register_method
from diffquant.modules import apply_plans, quant_layers, resolve_policy
from diffquant.quant import QuantSpec
from diffquant.quant.range_groups import spread

CHANNEL_AXIS, TOKEN_AXIS = -1, 1


@dataclass
class DGQConfig(ReconstructionMethodConfig):
    name = "dgq"
    needs_text = True
    PRESETS = {
        "paper": {"calibration": {"trajectories": 64, "policy": "all", "steps": 25}},
        "paper-sd": {
            "calibration": {"trajectories": 64, "policy": "all", "steps": 25},
            "reconstruct": True,
            "reconstruction": {"weight_iters": 20000, "batch_size": 8},
        },
        "fast": {
            "statistics_samples": 64,
            "calibration": {"trajectories": 16, "policy": "uniform", "uniform_steps": 8},
        },
    }
    PRESETS["reconstructed"] = {
        **PRESETS["fast"],
        "reconstruct": True,
        "reconstruction": {"weight_iters": 400, "weight_lr": 1e-2, "batch_size": 32},
    }
    groups: int = 8
    """Activation range groups per layer, G (the paper tries 1, 8, 16; G = 1 is per-tensor)."""
    activation_per_step: bool = True
    """One set of group ranges per sampling step (the paper's act_{t})."""
    log_softmax: bool = True
    """Quantize the post-softmax probabilities on a log2 grid (softmax_bits, default abits)."""
    bos_aware: bool = True
    """Keep the BOS token in float: out of the text-stream layers' ranges and as a float attention column."""
    text_layers: tuple[str, ...] | None = None
    """Patterns of the layers fed the text stream; None = found by running the model."""
    statistics_samples: int = 256
    """Calibration entries whose inputs decide each layer's grouping dimension."""
    reconstruct: bool = False
    """BRECQ weight reconstruction (the paper's SD v1.4 setting; `reconstruction` settings)."""
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(trajectories=64, policy="uniform", uniform_steps=25)
    )

    def validate(self) -> None:
        super().validate()
        if self.groups <= 0 or self.statistics_samples <= 0:
            raise ConfigError("dgq: groups and statistics_samples must be positive.")

    def activation_spec(self) -> QuantSpec | None:
        if self.weight_only:
            return None
        return QuantSpec(
            self.activation_format or f"uint{self.abits}",
            symmetric=False,
            granularity="per_channel",
            axis=CHANNEL_AXIS,
            range_groups=self.groups,
            per_step=self.activation_per_step,
        )

    def softmax_spec(self) -> QuantSpec | None:
        if self.weight_only or not self.log_softmax:
            return super().softmax_spec()
        return QuantSpec(f"log{self.softmax_bits or self.abits}", dynamic=True)


@dataclass
class _Ranges:
    """Running per-channel and per-token min/max of one layer's input."""

    channel_low: torch.Tensor | None = None
    channel_high: torch.Tensor | None = None
    token_low: torch.Tensor | None = None
    token_high: torch.Tensor | None = None
    tokens_vary: bool = False

    def update(self, x: torch.Tensor, is_conv: bool) -> None:
        x = x.detach().float()
        channel_axis = 1 if is_conv else x.ndim - 1
        per_channel = x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
        self.channel_low = _merge(self.channel_low, per_channel.amin(1), torch.minimum)
        self.channel_high = _merge(self.channel_high, per_channel.amax(1), torch.maximum)
        if is_conv or x.ndim != 3:
            self.tokens_vary = True
            return
        per_token = x.movedim(1, 0).reshape(x.shape[1], -1)
        if self.token_low is not None and self.token_low.shape[0] != per_token.shape[0]:
            self.tokens_vary = True
        if not self.tokens_vary:
            self.token_low = _merge(self.token_low, per_token.amin(1), torch.minimum)
            self.token_high = _merge(self.token_high, per_token.amax(1), torch.maximum)

    def group_axis(self) -> int:
        """DGQ's choice: the dimension whose ranges spread more (channels when tokens are not fixed)."""
        if self.tokens_vary or self.token_low is None:
            return CHANNEL_AXIS
        by_channel = spread(self.channel_low, self.channel_high)
        return TOKEN_AXIS if spread(self.token_low, self.token_high) > by_channel else CHANNEL_AXIS


def _merge(current: torch.Tensor | None, new: torch.Tensor, combine) -> torch.Tensor:
    return new if current is None else combine(current, new)


def input_ranges(
    denoiser: nn.Module, modules: dict[str, nn.Module], data: CalibrationSet, config: DGQConfig, progress: bool
) -> dict[str, _Ranges]:
    ranges = {name: _Ranges() for name in modules}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, r=ranges[name], conv=isinstance(module, nn.Conv2d): r.update(args[0], conv)
        )
        for name, module in modules.items()
    ]
    try:
        feed_calibration(denoiser, data, config.batch_size, "dgq: input statistics", progress)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


@register_method(
    DGQConfig,
    summary="DGQ: distribution-aware activation groups, log2 softmax, BOS kept float (ICLR 2025)",
)
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: DGQConfig, progress: bool = True) -> dict:
    text_token_count(calibration, "dgq")  # a model without text fails here, with the reason
    plans, attention = resolve_policy(denoiser, config.layer_policy())
    text = set(text_layers(denoiser, calibration, list(plans), config.text_layers, "dgq"))
    modules = {name: denoiser.get_submodule(name) for name, plan in plans.items() if plan.input is not None}
    data = random_subset(calibration, config.statistics_samples, 0)
    ranges = input_ranges(denoiser, modules, data, config, progress)
    axes: dict[str, int] = {}
    for name in modules:
        bos = config.bos_aware and name in text
        # the BOS token lies on the token axis: with it kept float, group over channels
        axes[name] = CHANNEL_AXIS if bos or isinstance(modules[name], nn.Conv2d) else ranges[name].group_axis()
        spec = plans[name].input.replace(axis=1 if isinstance(modules[name], nn.Conv2d) else axes[name])
        plans[name] = replace(plans[name], input=spec.replace(fp_leading_tokens=1) if bos else spec)
    if config.bos_aware:
        attention = {name: replace(plan, fp_text_bos=True) for name, plan in attention.items()}
    full_precision = full_precision_copy(denoiser) if config.reconstruct else None
    apply_plans(denoiser, plans, attention)
    for _, layer in quant_layers(denoiser):
        layer.calibrate_weight()
    resumed: dict = {}
    if config.reconstruct:  # step 1, SD v1.4 setting: BRECQ rounding before the activation ranges
        reconstructor = start_reconstruction(denoiser, full_precision, calibration, config, progress)
        reconstructor.weight_pass(discover_units(denoiser, probe(denoiser, calibration), block_patterns=config.blocks))
        resumed = finish_reconstruction(reconstructor)
    calibrate_ranges(denoiser, calibration, config.batch_size, progress)
    return {
        "groups": config.groups,
        "token_grouped_layers": sorted(n for n, a in axes.items() if a == TOKEN_AXIS),
        "text_layers": sorted(text),
        "log_softmax_attention": len(attention) if config.log_softmax else 0,
        "rounding": "adaround" if config.reconstruct else "nearest",
        **resumed,
    }
