"""Per-layer sensitivity probes and metric-decoupled costs (MixDQ, Zhao et al. ECCV 2024; ViDiT-Q-MP).

A layer's sensitivity at b bits is the damage to the model's output when only that layer is quantized,
at b bits, and everything else stays in float. Metric decoupling measures different layer groups
with different metrics: "content" layers (those carrying the text: cross-attention, feed-forward) by
how much the output's structure changes (1 - SSIM, MixDQ's content metric), "quality" layers by the
output's noise power relative to its signal (10^(-SQNR/10), MixDQ's quality metric). The costs feed
`engines.allocation.allocate_bits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from diffquant.calibration import CalibrationBatch, call_denoiser
from diffquant.errors import ConfigError
from diffquant.families import denoise
from diffquant.modules.layers import QuantLayer
from diffquant.modules.structure import input_and_output_layers, temporal_layers
from diffquant.quant import IntFormat, Quantizer, QuantSpec

QUALITY, CONTENT = "quality", "content"
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # Wang et al. 2004, for a unit data range


def relative_noise(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Noise power over signal power, 10^(-SQNR/10): MixDQ's quality metric as a cost."""
    return float((output - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def structural_dissimilarity(output: torch.Tensor, reference: torch.Tensor) -> float:
    """1 - SSIM of each sample against its reference (global means, variances and covariance), averaged:
    MixDQ's content metric as a cost."""
    out, ref = output.flatten(1).double(), reference.flatten(1).double()
    data_range = (ref.amax(1) - ref.amin(1)).clamp_min(1e-12)
    c1, c2 = SSIM_C1 * data_range**2, SSIM_C2 * data_range**2
    mean_o, mean_r = out.mean(1), ref.mean(1)
    var_o, var_r = out.var(1, unbiased=False), ref.var(1, unbiased=False)
    covariance = ((out - mean_o[:, None]) * (ref - mean_r[:, None])).mean(1)
    ssim = ((2 * mean_o * mean_r + c1) * (2 * covariance + c2)) / ((mean_o**2 + mean_r**2 + c1) * (var_o + var_r + c2))
    return float((1 - ssim).mean())


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    QUALITY: relative_noise,
    CONTENT: structural_dissimilarity,
}


def edge_and_embedder_layers(denoiser: nn.Module, batch: CalibrationBatch) -> list[str]:
    """What the 4-bit methods keep in float by structure: the first and last layers, and every layer whose
    input depends only on the timestep or conditioning (embedders, adaLN modulation), probed on `batch`."""
    first, last = input_and_output_layers(denoiser, lambda: call_denoiser(denoiser, batch))
    # by keyword: SD3's second positional input is encoder_hidden_states, not the timestep
    with_sample = lambda s: denoise(denoiser, s, batch.timesteps, batch.conditioning)  # noqa: E731
    return sorted({first, last, *temporal_layers(denoiser, with_sample, batch.sample)})


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` in float: every quantizer (weights, inputs, attention) passes values through."""
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    previous = [q.enabled for q in quantizers]
    for quantizer in quantizers:
        quantizer.enabled = False
    try:
        yield
    finally:
        for quantizer, enabled in zip(quantizers, previous, strict=True):
            quantizer.enabled = enabled


def spec_with_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    """The same integer grid (symmetry, granularity, observer) at another bit width."""
    if not isinstance(spec.number_format, IntFormat):
        raise ConfigError(
            f"Mixed-precision allocation changes integer bit widths; {spec.format} is not an integer grid."
        )
    return spec.replace(format=f"{'int' if spec.number_format.signed else 'uint'}{bits}")


def requantize_weight(layer: QuantLayer, bits: int) -> None:
    """Give `layer` a `bits`-wide weight grid of the same kind, calibrated on its weight."""
    if layer.weight_quantizer is None or layer.frozen:
        raise ConfigError("Only an unfrozen layer with a weight quantizer can change its weight bits.")
    quantizer = Quantizer(spec_with_bits(layer.weight_quantizer.spec, bits))
    quantizer.calibrate_static(layer.weight)
    layer.weight_quantizer = quantizer


def requantize_input(layer: QuantLayer, bits: int) -> None:
    """Give `layer`'s calibrated input quantizer a `bits`-wide grid of the same kind over the same range."""
    if layer.input_quantizer is None:
        raise ConfigError("Only a layer with an input quantizer can change its activation bits.")
    quantizer = layer.input_quantizer
    layer.input_quantizer = quantizer.regridded(spec_with_bits(quantizer.spec, bits))
    layer.input_quantizer.enabled = quantizer.enabled


def input_sizes(denoiser: nn.Module, layers: dict[str, QuantLayer], batch: CalibrationBatch) -> dict[str, int]:
    """Elements of each layer's input per sample on `batch`: the weight of its activation width in an
    average-bits budget (MixDQ's activation tensor ratios)."""
    sizes: dict[str, int] = {}

    def recorder(name: str):
        def record(_module, args) -> None:
            sizes[name] = sizes.get(name, 0) + args[0].numel() // max(batch.sample.shape[0], 1)

        return record

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), quantizers_disabled(denoiser):
            call_denoiser(denoiser, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(sizes))
    if missing:
        raise ConfigError(f"Layers never called on the probe batch, so no activation size: {missing[:5]}.")
    return sizes


def _outputs(denoiser: nn.Module, batches: list[CalibrationBatch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call_denoiser(denoiser, batch).detach() for batch in batches]


def _cost(metric: str, outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    score = METRICS[metric]
    return sum(score(o, r) for o, r in zip(outputs, references, strict=True)) / len(references)


def output_cost(
    denoiser: nn.Module, batches: list[CalibrationBatch], references: list[torch.Tensor], metric: str = QUALITY
) -> float:
    """The model's output cost against float `references` with its quantizers as they are now."""
    return _cost(metric, _outputs(denoiser, batches), references)


def float_outputs(denoiser: nn.Module, batches: list[CalibrationBatch]) -> list[torch.Tensor]:
    with quantizers_disabled(denoiser):
        return _outputs(denoiser, batches)


def _width_sensitivity(
    denoiser: nn.Module,
    layers: dict[str, QuantLayer],
    candidates: tuple[int, ...],
    metric_of: dict[str, str],
    batches: list[CalibrationBatch],
    role: str,
) -> dict[str, dict[int, float]]:
    """Cost of each layer's `role` quantizer ("weight" or "input") alone at each candidate width."""
    unknown = {metric_of[name] for name in layers} - set(METRICS)
    if unknown:
        raise ConfigError(f"Unknown sensitivity metric(s) {sorted(unknown)}; choose from {sorted(METRICS)}.")
    attribute, requantize = {
        "weight": ("weight_quantizer", requantize_weight),
        "input": ("input_quantizer", requantize_input),
    }[role]
    references = float_outputs(denoiser, batches)
    costs: dict[str, dict[int, float]] = {}
    with quantizers_disabled(denoiser):
        for name, layer in layers.items():
            original = getattr(layer, attribute)
            costs[name] = {}
            for bits in candidates:
                requantize(layer, bits)
                getattr(layer, attribute).enabled = True
                costs[name][bits] = output_cost(denoiser, batches, references, metric_of[name])
            setattr(layer, attribute, original)
    return costs


def weight_sensitivity(
    denoiser: nn.Module,
    layers: dict[str, QuantLayer],
    candidates: tuple[int, ...],
    metric_of: dict[str, str],
    batches: list[CalibrationBatch],
) -> dict[str, dict[int, float]]:
    """Cost of each layer's weights alone at each candidate width (everything else in float)."""
    return _width_sensitivity(denoiser, layers, candidates, metric_of, batches, "weight")


def activation_bit_sensitivity(
    denoiser: nn.Module,
    layers: dict[str, QuantLayer],
    candidates: tuple[int, ...],
    metric_of: dict[str, str],
    batches: list[CalibrationBatch],
) -> dict[str, dict[int, float]]:
    """Cost of each layer's calibrated input quantizer alone at each candidate width (everything else in
    float), the activation counterpart of `weight_sensitivity`."""
    return _width_sensitivity(denoiser, layers, candidates, metric_of, batches, "input")


def activation_sensitivity(
    denoiser: nn.Module, layers: dict[str, QuantLayer], metric_of: dict[str, str], batches: list[CalibrationBatch]
) -> dict[str, float]:
    """Cost of each layer's calibrated input quantizer alone (everything else in float)."""
    references = float_outputs(denoiser, batches)
    costs: dict[str, float] = {}
    with quantizers_disabled(denoiser):
        for name, layer in layers.items():
            if layer.input_quantizer is None:
                continue
            layer.input_quantizer.enabled = True
            costs[name] = output_cost(denoiser, batches, references, metric_of[name])
            layer.input_quantizer.enabled = False
    return costs


def decoupled_costs(sensitivity: dict[str, dict[int, float]], metric_of: dict[str, str]) -> dict[str, dict[int, float]]:
    """Costs of each metric group divided by that group's mean worst cost, so that groups measured on
    different metrics share one integer program."""
    scaled: dict[str, dict[int, float]] = {}
    for metric in set(metric_of[name] for name in sensitivity):
        members = [name for name in sensitivity if metric_of[name] == metric]
        unit = sum(max(sensitivity[name].values()) for name in members) / len(members)
        for name in members:
            scaled[name] = {bits: cost / max(unit, 1e-30) for bits, cost in sensitivity[name].items()}
    return scaled
