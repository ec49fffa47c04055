"""MixDQ (Zhao et al., ECCV 2024): BOS-aware text quantization and metric-decoupled mixed precision for
text-to-image diffusion models.

Algorithm (`paper` preset: the released W4A8 recipe; `fast` for CPUs):
  1. base PTQ, training-free: weights per output channel, symmetric min-max, round to nearest;
     activations per tensor, static, running-statistics (EMA 0.95) min-max over the calibration set;
  2. BOS-aware text quantization: the first (BOS) token of the prompt embedding is the same for every
     prompt and hundreds of times larger than the others; in every layer fed the text stream it passes
     through in float and stays out of the activation range, so the other tokens keep a fine grid;
  3. metric-decoupled sensitivity: each layer's weights are quantized alone at each candidate width;
     "content" layers (the text stream, cross-attention and feed-forward) are scored by 1 - SSIM of
     the output against float, "quality" layers (the rest) by its noise-to-signal power (SQNR);
  4. integer programming per group (engines.allocation, exact MILP): one bit width per layer, least
     total sensitivity, the group's parameter-weighted average within its budget; a ratio K splits the
     average budget between content and quality layers, each K in the scan gives one plan, and the
     plan whose output is closest to float (MSE, weights only) wins;
  5. activation mixed precision, after the weights: each layer's input quantized alone at each candidate
     width, scored by the same decoupled metrics; the same two integer programs and K scan, the average
     weighted by each input's size (MixDQ's activation tensor ratios); the plan closest to float wins;
  6. activation protection: the layers whose quantized input alone hurts the output most (top 1 %)
     keep float inputs.
Candidate widths: weights content {2, 4, 8}, quality {4, 8}; activations {4, 8}. The activation average
defaults to abits (every input at abits when abits is the widest candidate); the `mixed-activations`
preset sets 7.77, one of the released configs' activation averages.
Only for text-conditioned models: without a text input, one clear error says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.calibration.dataset import random_subset
from diffquant.calibration.validation import text_token_count
from diffquant.engines import calibrate_ranges
from diffquant.engines.allocation import Allocation, allocate_bits, budget_for_average_bits
from diffquant.engines.sensitivity import (
    CONTENT,
    QUALITY,
    activation_bit_sensitivity,
    activation_sensitivity,
    float_outputs,
    input_sizes,
    output_cost,
    quantizers_disabled,
    requantize_input,
    requantize_weight,
    weight_sensitivity,
)
from diffquant.engines.text_stream import text_layers
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods.base import CalibrationConfig, MethodConfig
from diffquant.methods.registry import register_method
from diffquant.modules import apply_plans, quant_layers, resolve_policy
from diffquant.modules.layers import QuantLayer
from diffquant.modules.policy import pattern_matches
from diffquant.quant import QuantSpec

CONTENT_PATTERNS = ("*attn2*", "*cross_attn*", "*.ff.*", "*ff_context*")
"""Cross-attention and feed-forward layers by name (MixDQ's content group), besides the text stream."""


@dataclass
class MixDQConfig(MethodConfig):
    name = "mixdq"
    needs_text = True
    PRESETS = {
        "paper": {"calibration": {"trajectories": 32, "policy": "uniform"}},
        "fast": {
            "budget_ratios": (0.9, 1.0, 1.1),
            "sensitivity_samples": 8,
            "calibration": {"trajectories": 16, "policy": "uniform", "uniform_steps": 8},
        },
        "mixed-activations": {
            "average_activation_bits": 7.77,
            "budget_ratios": (0.9, 1.0, 1.1),
            "sensitivity_samples": 8,
            "calibration": {"trajectories": 16, "policy": "uniform", "uniform_steps": 8},
        },
    }
    wbits: int = 4
    abits: int | None = 8
    content_bit_choices: tuple[int, ...] = (2, 4, 8)
    """Candidate weight widths of content layers."""
    quality_bit_choices: tuple[int, ...] = (4, 8)
    """Candidate weight widths of quality layers."""
    average_weight_bits: float | None = None
    """Parameter-weighted average weight width of the plan; None = wbits."""
    budget_ratios: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
    """Values of K scanned: content layers get K x the average budget, quality layers the rest."""
    activation_bit_choices: tuple[int, ...] = (4, 8)
    """Candidate input widths of every quantized activation."""
    average_activation_bits: float | None = None
    """Input-size-weighted average activation width of the plan; None = abits."""
    protect_share: float = 0.01
    """Share of layers (the most activation-sensitive, at least one when > 0) whose inputs stay float."""
    bos_aware: bool = True
    """Keep the BOS token of the text stream in float and out of the activation ranges."""
    text_layers: tuple[str, ...] | None = None
    """Patterns of the layers fed the text stream; None = found by running the model."""
    sensitivity_samples: int = 16
    """Calibration entries the sensitivity probes run the model on."""
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(trajectories=32, policy="uniform", uniform_steps=25)
    )

    def validate(self) -> None:
        super().validate()
        for name in ("content_bit_choices", "quality_bit_choices", "activation_bit_choices"):
            choices = getattr(self, name)
            if not choices or any(not 1 <= b <= 16 for b in choices):
                raise ConfigError(f"mixdq: {name} must be widths in 1-16, got {choices}.")
        if not self.budget_ratios or any(k <= 0 for k in self.budget_ratios):
            raise ConfigError(f"mixdq: budget_ratios must be positive, got {self.budget_ratios}.")
        if self.average_activation_bits is not None and self.abits is None:
            raise ConfigError("mixdq: average_activation_bits needs quantized activations; set abits (e.g. --abits 8).")
        if not 0.0 <= self.protect_share < 1.0 or self.sensitivity_samples <= 0:
            raise ConfigError("mixdq: protect_share must lie in [0, 1) and sensitivity_samples be positive.")

    def activation_spec(self) -> QuantSpec | None:
        spec = super().activation_spec()
        return spec.replace(observer="ema") if spec else None  # MixDQ's running-stat min-max


def _group_plan(
    sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], members: list[str], average: float
) -> Allocation:
    return allocate_bits(
        {n: sensitivity[n] for n in members},
        {n: sizes[n] for n in members},
        budget_for_average_bits({n: sizes[n] for n in members}, average),
    )


def candidate_plans(
    sensitivity: dict[str, dict[int, float]],
    sizes: dict[str, int],
    content: list[str],
    average: float,
    ratios: tuple[float, ...],
    what: str = "weight",
) -> dict[float, dict[str, int]]:
    """One bit plan per budget ratio K that both groups' programs can meet (`sizes` weigh the average)."""
    quality = [n for n in sizes if n not in content]
    if not content or not quality:
        return {1.0: _group_plan(sensitivity, sizes, list(sizes), average).bits}
    total = average * sum(sizes.values())
    content_size, quality_size = sum(sizes[n] for n in content), sum(sizes[n] for n in quality)
    plans: dict[float, dict[str, int]] = {}
    for ratio in ratios:
        content_average = ratio * average
        quality_average = (total - content_average * content_size) / quality_size
        try:
            plans[ratio] = {
                **_group_plan(sensitivity, sizes, content, content_average).bits,
                **_group_plan(sensitivity, sizes, quality, quality_average).bits,
            }
        except DiffquantError:
            continue
    if not plans:
        raise DiffquantError(
            f"mixdq: no budget ratio in {ratios} gives a feasible {what} plan at {average} average bits; widen "
            f"the candidate widths (content/quality/activation_bit_choices) or raise average_{what}_bits."
        )
    return plans


def weighted_average(bits: dict[str, int], sizes: dict[str, int]) -> float:
    return sum(sizes[n] * b for n, b in bits.items()) / sum(sizes[n] for n in bits)


def best_plan(
    denoiser: nn.Module,
    plans: dict[float, dict[str, int]],
    set_width: Callable[[str, int], None],
    probe: list,
    references: list,
    weights_only: bool,
) -> tuple[float, dict[float, float]]:
    """Apply every candidate plan, score the model's output against float, keep the closest plan."""
    scores: dict[float, float] = {}
    for ratio, bits in plans.items():
        for name, width in bits.items():
            set_width(name, width)
        if weights_only:  # MixDQ scores the weight plans with float activations
            with quantizers_disabled(denoiser):
                for module in denoiser.modules():
                    if isinstance(module, QuantLayer) and module.weight_quantizer is not None:
                        module.weight_quantizer.enabled = True
                scores[ratio] = output_cost(denoiser, probe, references)
        else:
            scores[ratio] = output_cost(denoiser, probe, references)
    chosen = min(scores, key=scores.get)
    for name, width in plans[chosen].items():
        set_width(name, width)
    return chosen, scores


def activation_plan(
    denoiser: nn.Module,
    inputs: dict[str, QuantLayer],
    content: list[str],
    metric_of: dict[str, str],
    probe: list,
    references: list,
    config: MixDQConfig,
) -> dict:
    """Step 5: input widths from the decoupled sensitivities, one program per group, K scanned."""
    average = config.abits if config.average_activation_bits is None else config.average_activation_bits
    choices = tuple(sorted(config.activation_bit_choices))
    forced = average is not None and (average >= choices[-1] == config.abits or average <= choices[0] == config.abits)
    if not inputs or average is None or forced:
        return {}  # the budget leaves every input at abits: nothing to allocate
    metrics = {n: metric_of.get(n, QUALITY) for n in inputs}
    sensitivity = activation_bit_sensitivity(denoiser, inputs, choices, metrics, probe)
    sizes = input_sizes(denoiser, inputs, probe[0])
    plans = candidate_plans(
        sensitivity, sizes, [n for n in inputs if n in content], average, config.budget_ratios, "activation"
    )
    chosen, scores = best_plan(
        denoiser, plans, lambda n, b: requantize_input(inputs[n], b), probe, references, weights_only=False
    )
    return {
        "activation_bits": plans[chosen],
        "activation_budget_ratio": chosen,
        "activation_plan_output_error": {str(k): round(v, 6) for k, v in scores.items()},
        "average_activation_bits": round(weighted_average(plans[chosen], sizes), 4),
    }


@register_method(
    MixDQConfig,
    summary="MixDQ: BOS-aware text quantization, metric-decoupled sensitivity, integer-program bits (ECCV 2024)",
)
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: MixDQConfig, progress: bool = True) -> dict:
    text_token_count(calibration, "mixdq")  # a model without text fails here, with the reason
    plans, attention = resolve_policy(denoiser, config.layer_policy())
    text = text_layers(denoiser, calibration, list(plans), config.text_layers, "mixdq")
    if config.bos_aware:  # step 2: the BOS token bypasses the input quantizers of the text stream
        for name in text:
            if plans[name].input is not None:
                plans[name] = replace(plans[name], input=plans[name].input.replace(fp_leading_tokens=1))
    apply_plans(denoiser, plans, attention)
    layers: dict[str, QuantLayer] = {n: m for n, m in quant_layers(denoiser) if m.weight_quantizer is not None}
    for layer in layers.values():
        layer.calibrate_weight()
    calibrate_ranges(denoiser, calibration, config.batch_size, progress)

    # steps 3-4: metric-decoupled sensitivity, one integer program per group, K scanned
    content = [n for n in layers if n in text or any(pattern_matches(p, n) for p in CONTENT_PATTERNS)]
    metric_of = {n: CONTENT if n in content else QUALITY for n in layers}
    probe = list(random_subset(calibration, config.sensitivity_samples, 1).batches(config.batch_size))
    sensitivity = {
        **weight_sensitivity(
            denoiser, {n: layers[n] for n in content}, tuple(config.content_bit_choices), metric_of, probe
        ),
        **weight_sensitivity(
            denoiser,
            {n: m for n, m in layers.items() if n not in content},
            tuple(config.quality_bit_choices),
            metric_of,
            probe,
        ),
    }
    sizes = {n: layer.weight.numel() for n, layer in layers.items()}
    average = config.wbits if config.average_weight_bits is None else config.average_weight_bits
    weight_plans = candidate_plans(sensitivity, sizes, content, average, config.budget_ratios)
    references = float_outputs(denoiser, probe)
    chosen, scores = best_plan(
        denoiser, weight_plans, lambda n, b: requantize_weight(layers[n], b), probe, references, weights_only=True
    )

    # step 5: activation mixed precision, planned like the weights once the weights are fixed
    inputs = {n: m for n, m in quant_layers(denoiser) if m.input_quantizer is not None}
    activation = activation_plan(denoiser, inputs, content, metric_of, probe, references, config)

    # step 6: protect the most activation-sensitive inputs
    protected: list[str] = []
    if inputs and config.protect_share > 0:
        costs = activation_sensitivity(denoiser, inputs, {n: metric_of.get(n, QUALITY) for n in inputs}, probe)
        protected = sorted(costs, key=costs.get, reverse=True)[: math.ceil(config.protect_share * len(costs))]
        for name in protected:
            inputs[name].input_quantizer = None
    return {
        "text_layers": text,
        "bos_aware": config.bos_aware,
        "content_layers": content,
        "weight_bits": weight_plans[chosen],
        "budget_ratio": chosen,
        "plan_output_error": {str(k): round(v, 6) for k, v in scores.items()},
        "average_weight_bits": round(weighted_average(weight_plans[chosen], sizes), 4),
        **activation,
        "protected_inputs": protected,
    }
