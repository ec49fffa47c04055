"""Observer-based post-training quantization: wrap layers, fix weight grids, observe activation ranges.

This is the whole algorithm of naive PTQ and PTQ4DM, and the initialisation every reconstruction
method starts from.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from diffquant.calibration import CalibrationSet, call_denoiser, feed_calibration
from diffquant.modules import (
    LayerPolicy,
    activation_quantizers,
    activations_disabled,
    apply_plans,
    finish_observing,
    quant_layers,
    resolve_policy,
    set_activation_quantization,
    start_observing,
)
from diffquant.modules.policy import AttentionPlan, LayerPlan


def prepare_model(
    denoiser: nn.Module, policy: LayerPolicy, splits: dict[str, int] | None = None
) -> tuple[dict[str, LayerPlan], dict[str, AttentionPlan]]:
    """Swap in quantized modules per the policy and fix every weight quantizer's grid."""
    layers, attention = resolve_policy(denoiser, policy, splits)
    apply_plans(denoiser, layers, attention)
    for _, layer in quant_layers(denoiser):
        layer.calibrate_weight()
    return layers, attention


def probe(denoiser: nn.Module, calibration: CalibrationSet, size: int = 4) -> Callable[[], object]:
    """A callable that runs the denoiser once on a few calibration inputs, activation quantization off
    (for structure discovery before activation ranges exist)."""
    batch = next(calibration.batches(size))

    def run() -> object:
        with activations_disabled(denoiser):
            return call_denoiser(denoiser, batch)

    return run


def calibrate_ranges(
    denoiser: nn.Module, calibration: CalibrationSet, batch_size: int = 64, progress: bool = True
) -> None:
    """Observe activation ranges on the calibration set (weights already fake-quantized), then fix them."""
    if not any(not q.spec.dynamic for _, q in activation_quantizers(denoiser)):
        return
    start_observing(denoiser)
    try:
        feed_calibration(denoiser, calibration, batch_size, "observe activations", progress)
    except BaseException:
        for _, quantizer in activation_quantizers(denoiser):
            quantizer.observing = False
        raise
    finish_observing(denoiser)
    set_activation_quantization(denoiser, True)
