"""SVDQuant (Li et al., ICLR 2025): absorb 4-bit outliers with a 16-bit low-rank branch.

Algorithm (deepcompressor's defaults; `paper` preset INT4, `nvfp4` preset NVFP4, `fast` for CPUs):
  1. keep the sensitive layers in 16 bits: embeddings and time projections (layers whose input depends
     only on timestep/conditioning), shortcuts, down/up-samplers, the input and output projections;
     adaLN modulation linears get 4-bit weights with float inputs (W4A16, no branch); attention
     matmuls stay in floating point;
  2. weights: INT4 symmetric, one scale per 64 input weights (NVFP4: E2M1, group 16, E4M3 scales);
     activations: dynamic, one scale per token and group of 64 channels, computed at run time;
     post-GELU inputs (never below GELU's minimum) use all 16 levels on their non-negative range;
  3. per layer, smoothing x/s, W diag(s) with s = max|X|^a / max|W|^(1-a), a searched on a grid (and
     "no smoothing") by the layer's output error with both operands quantized and the branch on;
  4. the SVD of the smoothed weight gives a rank-32 branch U D kept in 16 bits; the 4-bit grid holds
     only the residual R = W diag(s) - U D;
  5. GPTQ rounds the residual (damping 0.01, blocks of 128) on the Hessian of its real inputs.
  5'. not in the paper (`reconstructed` preset): the residuals' rounding is instead learned block by
     block (AdaRound/BRECQ, as TFMQ-DM does) against the full-precision block outputs, with the dynamic
     4-bit activations on, so the rounding also compensates the activation error.
Parameters do not depend on the sampling step. The low-rank branch adds (out + in) x rank 16-bit
values per layer; `details["branch_bits_per_weight"]` reports that cost on the quantized layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from diffquant.calibration import CalibrationSet, feed_calibration
from diffquant.calibration.dataset import random_subset
from diffquant.engines import discover_units, probe
from diffquant.engines.gptq import GPTQConfig, HessianAccumulator, gptq_layer
from diffquant.engines.sensitivity import edge_and_embedder_layers
from diffquant.engines.smoothing import channel_absmax, search_smoothing
from diffquant.errors import ConfigError
from diffquant.methods.base import CalibrationConfig
from diffquant.methods.reconstruction_base import (
    ReconstructionMethodConfig,
    finish_reconstruction,
    full_precision_copy,
    start_reconstruction,
)
from diffquant.methods.registry import register_method
from diffquant.modules import LowRankQuantLayer, apply_plans, resolve_policy
from diffquant.modules.policy import WEIGHT_LAYER_TYPES, pattern_matches
from diffquant.modules.structure import modulation_layers
from diffquant.quant import IntFormat, QuantSpec
from diffquant.quant.formats import parse_format

PIXART_RANK_FRACTION = 32 / 1152
"""The paper's rank-to-width ratio on PixArt-Sigma (rank 32, 1152 channels): a branch of ~0.9 bits per weight."""
GELU_MINIMUM = -0.171875
"""deepcompressor's shift for post-GELU activations (GELU's minimum is -0.16997)."""
PAPER_ALPHAS = tuple(round(i / 20, 2) for i in range(1, 20))  # deepcompressor: num_grids 20
SKIPPED_NAME_PATTERNS = ("*shortcut*", "*samplers*", "*proj_in*", "*proj_out*", "*pos_embed*", "*emb*")
"""SVDQuant's skip list by name: shortcuts, down/up-samplers, transformer proj in/out, embeddings."""


_FAST = {
    "smoothing_alphas": (0.25, 0.4, 0.5, 0.6, 0.75),
    "calibration_samples": 128,
    "search_samples": 32,
    "calibration": {"trajectories": 32, "policy": "uniform", "uniform_steps": 10},
}


@dataclass
class SVDQuantConfig(ReconstructionMethodConfig):
    name = "svdquant"
    PRESETS = {
        "paper": {"calibration": {"trajectories": 128, "policy": "all"}},
        "nvfp4": {
            "weight_format": "nvfp4",
            "activation_format": "nvfp4",
            "weight_group_size": 16,
            "activation_group_size": 16,
            "calibration": {"trajectories": 128, "policy": "all"},
        },
        "scaled": {"rank_fraction": PIXART_RANK_FRACTION, "calibration": {"trajectories": 128, "policy": "all"}},
        "fast": _FAST,
        "reconstructed": {
            **_FAST,
            "reconstruct": True,
            "reconstruction": {"weight_iters": 400, "weight_lr": 1e-2, "batch_size": 32, "float_lr": 1e-4},
        },
    }
    PRESETS["reconstructed-scaled"] = {**PRESETS["reconstructed"], "rank_fraction": PIXART_RANK_FRACTION}
    # finer 4-bit activations (one dynamic scale per 16 channels, NVFP4's block) and adaLN kept in 16 bits
    PRESETS["reconstructed-fine"] = {
        **PRESETS["reconstructed"],
        "activation_group_size": 16,
        "modulation_weight_only": False,
    }
    wbits: int = 4
    abits: int | None = 4
    weight_group_size: int | None = 64
    """Weights per scale along the input dimension (paper: 64 for INT4, 16 for NVFP4)."""
    activation_group_size: int = 64
    """Channels per dynamic activation scale, per token (paper: 64 for INT4, 16 for NVFP4)."""
    rank: int = 32
    """Rank of the 16-bit low-rank branch (capped at each layer's smaller dimension)."""
    rank_fraction: float | None = None
    """If set, each layer's rank is this fraction of its smaller dimension (at least 1) instead of `rank`:
    rank 32 is ~1-3 % of the paper's 1152-3072-wide layers but half of a 64-wide one, where the branch
    would cost more bits than the 4-bit residual (`scaled` preset: the PixArt ratio 32/1152)."""
    smoothing_alphas: tuple[float, ...] = PAPER_ALPHAS
    """Migration strengths tried per layer (plus no smoothing); empty = no smoothing."""
    rotate: bool = False
    """Hadamard-rotate the layer input as well (QuaRot-style; not in the paper)."""
    gptq: bool = True
    """Round the residual with GPTQ (else round to nearest); `reconstruct` replaces it."""
    gptq_damping: float = 0.01
    gptq_block_size: int = 128
    reconstruct: bool = False
    """Not in the paper: learn the residuals' rounding block by block (AdaRound, `reconstruction` settings)
    with the activations quantized, instead of GPTQ."""
    keep_sensitive: bool = True
    """Keep the official skip list in 16 bits (see the module docstring)."""
    unsigned_post_gelu: bool = True
    """Inputs that never go below GELU's minimum (post-GELU) get an asymmetric grid, so all 16 levels cover
    their range (deepcompressor shifts them by 0.171875 and uses unsigned INT4; a per-group zero point
    reaches the same levels without a fixed shift)."""
    modulation_weight_only: bool = True
    """adaLN modulation linears get 4-bit weights and float inputs (W4A16, as Nunchaku runs them) rather
    than staying whole in 16 bits; no branch, no smoothing."""
    calibration_samples: int = 512
    """Calibration entries used for activation ranges and GPTQ Hessians."""
    search_samples: int = 64
    """Calibration entries whose layer inputs score the smoothing candidates."""
    weight_observer: str = "lp"
    """Weight range search: lp (shrink grid, the paper's range search) or minmax."""
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(trajectories=128, policy="uniform", uniform_steps=25)
    )

    def validate(self) -> None:
        super().validate()
        if self.rank < 0 or self.activation_group_size <= 0:
            raise ConfigError("svdquant: rank must be >= 0 and activation_group_size positive.")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise ConfigError(f"svdquant: rank_fraction must lie in (0, 1], got {self.rank_fraction}.")
        if any(not 0.0 <= a <= 1.0 for a in self.smoothing_alphas):
            raise ConfigError(f"svdquant: smoothing alphas must lie in [0, 1], got {self.smoothing_alphas}.")
        if self.calibration_samples <= 0 or self.search_samples <= 0:
            raise ConfigError("svdquant: calibration_samples and search_samples must be positive.")
        if self.weight_observer not in ("lp", "minmax"):
            raise ConfigError("svdquant: weight_observer must be lp or minmax.")
        GPTQConfig(self.gptq_damping, self.gptq_block_size).validate()
        if self.reconstruct and not isinstance(parse_format(self.weight_format or f"int{self.wbits}"), IntFormat):
            raise ConfigError("svdquant: reconstruct learns integer rounding (AdaRound); use an INT weight format.")

    def weight_spec(self) -> QuantSpec:
        # shrink grid up to 20 % (deepcompressor: max_shrink 0.2), Lp error
        return super().weight_spec().replace(observer=self.weight_observer, grid=20)

    def activation_spec(self) -> QuantSpec | None:
        if self.weight_only:
            return None
        fmt = self.activation_format or f"int{self.abits}"
        return QuantSpec(fmt, granularity="token_group", group_size=self.activation_group_size, dynamic=True)


def sensitive_layers(denoiser: nn.Module, batch) -> list[str]:
    """The layers SVDQuant keeps in 16 bits, found by structure (time/conditioning-only inputs, first and
    last layers) and by name (shortcuts, samplers, projections in/out, embeddings)."""
    names = [n for n, m in denoiser.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES) and n]
    by_name = [n for n in names if any(pattern_matches(p, n) for p in SKIPPED_NAME_PATTERNS)]
    return sorted({*edge_and_embedder_layers(denoiser, batch), *by_name})


def _unsigned(spec: QuantSpec | None) -> QuantSpec | None:
    """An integer input grid made asymmetric: all its levels on a range that is (almost) non-negative."""
    if spec is None or not isinstance(spec.number_format, IntFormat):
        return spec  # float formats (NVFP4) keep their sign bit
    return spec.replace(symmetric=False)


def branch_rank(config: SVDQuantConfig, out_features: int, in_features: int) -> int:
    """The low-rank branch's rank for one layer: `rank`, or `rank_fraction` of its smaller side."""
    smaller = min(out_features, in_features)
    if config.rank_fraction is not None:
        return max(1, round(config.rank_fraction * smaller))
    return min(config.rank, smaller)


def _record_inputs(
    denoiser: nn.Module, modules: dict[str, nn.Module], data: CalibrationSet, config: SVDQuantConfig, progress: bool
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, torch.Tensor]]:
    """Per layer: the per-channel max |x| over `data`, the smallest input value, and a sample of about
    `search_samples` inputs spread over the sampling steps."""
    absmax: dict[str, torch.Tensor] = {}
    lowest: dict[str, float] = {}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    batches = max(1, len(data.steps))
    per_batch = max(1, math.ceil(config.search_samples / batches))

    def hook(name: str, module: nn.Module):
        def grab(_module, args):
            x = args[0].detach()
            amax = channel_absmax(x, 1 if isinstance(module, nn.Conv2d) else x.ndim - 1)
            absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)
            lowest[name] = min(lowest.get(name, float("inf")), x.min().item())
            kept[name].append(x[:per_batch].clone())

        return grab

    handles = [module.register_forward_pre_hook(hook(name, module)) for name, module in modules.items()]
    try:
        feed_calibration(denoiser, data, config.batch_size, "svdquant: record inputs", progress)
    finally:
        for handle in handles:
            handle.remove()
    return absmax, lowest, {name: torch.cat(parts)[: config.search_samples] for name, parts in kept.items()}


def _accumulate_hessians(
    denoiser: nn.Module, layers: dict[str, LowRankQuantLayer], data: CalibrationSet, config: SVDQuantConfig, progress
) -> dict[str, HessianAccumulator]:
    """H = 2 X^T X of every residual's real inputs (smoothed, earlier layers already quantized)."""
    accumulators = {name: HessianAccumulator(layer.residual) for name, layer in layers.items()}
    handles = [
        layer.residual.register_forward_pre_hook(lambda _m, args, a=accumulators[name]: a.add(args[0]))
        for name, layer in layers.items()
    ]
    try:
        feed_calibration(denoiser, data, config.batch_size, "svdquant: GPTQ Hessians", progress)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


@register_method(SVDQuantConfig, summary="SVDQuant: smoothing + 16-bit low-rank branch + GPTQ, W4A4 (ICLR 2025)")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: SVDQuantConfig, progress: bool = True) -> dict:
    batch = next(calibration.batches(min(8, config.batch_size)))
    skipped = sensitive_layers(denoiser, batch) if config.keep_sensitive else []
    modulation = [n for n in modulation_layers(denoiser) if n in skipped] if config.modulation_weight_only else []
    skipped = [n for n in skipped if n not in modulation]
    policy = config.layer_policy()
    policy = replace(policy, keep_fp=tuple(dict.fromkeys((*policy.keep_fp, *skipped))))
    plans, attention = resolve_policy(denoiser, policy)
    weight_only = {name: replace(plans.pop(name), input=None) for name in modulation if name in plans}
    # grouped (depthwise) convs have no low-rank form: they keep a plain 4-bit layer, no branch (SANA)
    plain = {name: plans.pop(name) for name in list(plans) if getattr(denoiser.get_submodule(name), "groups", 1) != 1}
    full_precision = full_precision_copy(denoiser) if config.reconstruct else None
    originals = {name: denoiser.get_submodule(name) for name in plans}
    weights = {name: module.weight.detach().clone() for name, module in originals.items()}
    data = random_subset(calibration, config.calibration_samples, config.calibration.seed)
    absmax, lowest, inputs = _record_inputs(denoiser, originals, data, config, progress)
    targets = {name: originals[name](inputs[name]).detach() for name in plans}

    ranks = {name: branch_rank(config, w.shape[0], w[0].numel()) for name, w in weights.items()}
    post_gelu = [name for name in plans if config.unsigned_post_gelu and lowest[name] >= GELU_MINIMUM]
    lowrank_plans = {
        name: replace(
            plan,
            input=_unsigned(plan.input) if name in post_gelu else plan.input,
            lowrank={"rank": ranks[name], "rotate": config.rotate},
        )
        for name, plan in plans.items()
    }
    apply_plans(denoiser, {**lowrank_plans, **weight_only, **plain}, attention)
    for name in (*weight_only, *plain):
        denoiser.get_submodule(name).calibrate_weight()
    layers: dict[str, LowRankQuantLayer] = {name: denoiser.get_submodule(name) for name in plans}
    chosen: dict[str, float | None] = {}
    gains: list[float] = []
    for name, layer in layers.items():
        result = search_smoothing(
            layer, weights[name], inputs[name], targets[name], absmax[name], config.smoothing_alphas, ranks[name]
        )
        chosen[name] = result.alpha
        gains.append(result.error / max(result.baseline_error, 1e-30))
    resumed: dict = {}
    if config.reconstruct:
        reconstructor = start_reconstruction(denoiser, full_precision, calibration, config, progress)
        units = discover_units(denoiser, probe(denoiser, calibration), block_patterns=config.blocks)
        reconstructor.weight_pass(units, with_activations=not config.weight_only)
        resumed = finish_reconstruction(reconstructor)
    elif config.gptq:
        accumulators = _accumulate_hessians(denoiser, layers, data, config, progress)
        gptq = GPTQConfig(config.gptq_damping, config.gptq_block_size)
        for name, layer in layers.items():
            gptq_layer(layer.residual, accumulators[name].hessian, gptq)
    quantized_weights = sum(w.numel() for w in weights.values())
    branch_values = sum(layer.lora_up.numel() + layer.lora_down.numel() for layer in layers.values())
    return {
        "kept_16bit": skipped,
        "weight_only_modulation": sorted(weight_only),
        "plain_grouped_convs": sorted(plain),
        "post_gelu_unsigned_inputs": post_gelu,
        "lowrank_layers": len(layers),
        "smoothing_alphas": chosen,
        "smoothing_error_ratio_mean": round(sum(gains) / max(1, len(gains)), 4),
        "branch_bits_per_weight": round(16 * branch_values / max(1, quantized_weights), 3),
        # reconstruct takes the place of GPTQ: say which rounding the residuals got
        "rounding": "adaround" if config.reconstruct else "gptq" if config.gptq else "nearest",
        **resumed,
    }
