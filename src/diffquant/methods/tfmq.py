"""TFMQ-DM (Huang et al., CVPR 2024): temporal feature maintenance quantization.

Algorithm (official code defaults; `paper` preset, `fast` for CPUs):
  1. calibration along full-precision trajectories at every step (activations) and at a uniform
     interval of `weight_steps` steps (weights);
  2. the temporal information block (TIB) - every layer fed only by the timestep/conditioning - is
     reconstructed as one unit against its full-precision temporal features (TIAR);
  3. block reconstruction (AdaRound) of the remaining layers, with the temporal branches frozen;
  4. finite-set calibration (FSC): one activation range per sampling step, min-max with a running
     EMA (momentum 0.95), selected at run time by the sampling step;
  5. as `disable_out_quantization`: the input layer, the first temporal layer and the output layer
     keep full-precision weights; the first four layers and the last take full-precision inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffquant.calibration import CalibrationSet, UniformSteps
from diffquant.engines import calibrate_ranges, discover_units, prepare_model, probe, reconstruct_temporal
from diffquant.families import denoise
from diffquant.methods.base import CalibrationConfig
from diffquant.methods.reconstruction_base import (
    ReconstructionMethodConfig,
    finish_reconstruction,
    full_precision_copy,
    start_reconstruction,
)
from diffquant.methods.registry import register_method
from diffquant.modules import LayerOverride
from diffquant.modules.structure import execution_order, input_and_output_layers, temporal_layers
from diffquant.quant import QuantSpec


@dataclass
class TFMQConfig(ReconstructionMethodConfig):
    name = "tfmq"
    PRESETS = {
        "paper": {
            "calibration": {"trajectories": 256, "policy": "all"},
            "reconstruction": {"weight_iters": 20000, "batch_size": 32},
            "weight_steps": 20,
        },
        "fast": {
            "calibration": {"trajectories": 32, "policy": "all"},
            "reconstruction": {"weight_iters": 400, "weight_lr": 1e-2, "batch_size": 32},
            "weight_steps": 10,
        },
    }
    activation_per_step: bool = True
    weight_steps: int = 20
    """Sampling steps (uniform interval) whose inputs feed weight reconstruction."""
    keep_edges_fp: bool = True
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(trajectories=256, policy="all"))

    def activation_spec(self) -> QuantSpec | None:
        spec = super().activation_spec()
        return spec.replace(observer="ema", ema_momentum=0.95) if spec else None


def _edge_overrides(denoiser: nn.Module, run, temporal: list[str]) -> tuple[LayerOverride, ...]:
    first, last = input_and_output_layers(denoiser, run)
    order, _ = execution_order(denoiser, run)
    overrides = [LayerOverride(name, quantize_weight=False) for name in {first, last, *temporal[:1]}]
    overrides += [LayerOverride(name, quantize_input=False) for name in {*order[:4], last}]
    return tuple(overrides)


@register_method(TFMQConfig, summary="TFMQ-DM: temporal block reconstruction + per-step ranges (CVPR 2024)")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: TFMQConfig, progress: bool = True) -> dict:
    full_precision = full_precision_copy(denoiser)
    run = probe(denoiser, calibration)
    batch = next(calibration.batches(4))
    with_sample = lambda s: denoise(denoiser, s, batch.timesteps, batch.conditioning)  # noqa: E731
    temporal = temporal_layers(denoiser, with_sample, batch.sample)
    edges = _edge_overrides(denoiser, run, temporal) if config.keep_edges_fp else ()
    prepare_model(denoiser, config.layer_policy(extra_overrides=edges))

    weight_steps = set(UniformSteps(min(config.weight_steps, calibration.num_steps)).steps(calibration.num_steps))
    chosen = [s for s in calibration.steps if s in weight_steps] or calibration.steps
    weight_data = calibration.subset(torch.nonzero(torch.isin(calibration.step_index, torch.tensor(chosen))).flatten())

    reconstructor = start_reconstruction(
        denoiser, full_precision, weight_data, config, progress, frozen_layers=temporal
    )
    reconstruct_temporal(reconstructor, temporal)
    units = discover_units(
        denoiser, probe(denoiser, calibration), exclude_layers=set(temporal), block_patterns=config.blocks
    )
    reconstructor.weight_pass(units)
    if not config.weight_only:
        reconstructor.run_once(
            "finite_set_calibration", lambda: calibrate_ranges(denoiser, calibration, config.batch_size, progress)
        )
    resumed = finish_reconstruction(reconstructor)
    return {"temporal_layers": temporal, "units": len(units), "weight_steps": chosen, **resumed}
