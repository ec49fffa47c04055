"""EDA-DM (Liu et al., 2024): enhanced distribution alignment for post-training quantization.

Algorithm (official defaults, CIFAR W4A8 row; `paper` preset, `fast` for CPUs):
  1. TDAC: per-step calibration sample counts from the density and variety of a mid-network feature
     along full-precision trajectories (w_t = D_t + lambda V_t, lambda = 1.2), N = 1,024 samples;
  2. Q-Diffusion's base quantizers: channel-wise weights, per-tensor activations, split shortcut,
     attention matmuls quantized with the softmax output at 8 bits;
  3. FBR: block reconstruction whose loss adds every layer's output error (add_loss = 0.8), with the
     AdaRound variables (lr 0.5) and activation step sizes (lr 5e-4) optimised jointly, no rounding
     regulariser;
  4. one parameter set for all timesteps (deployment-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.engines import ReconstructionConfig, calibrate_ranges, discover_units, prepare_model, probe
from diffquant.methods.base import CalibrationConfig
from diffquant.methods.qdiffusion import DEPLOY_CHOICES, QDiffusionConfig
from diffquant.methods.reconstruction_base import (
    finish_reconstruction,
    full_precision_copy,
    start_reconstruction,
)
from diffquant.methods.registry import register_method
from diffquant.modules.structure import skip_concat_splits


def _edadm_engine(**changes) -> ReconstructionConfig:
    base = {"joint": True, "layer_loss_weight": 0.8, "weight_lr": 0.5, "act_lr": 5e-4, "batch_size": 32}
    return ReconstructionConfig(**{**base, **changes})


@dataclass
class EDADMConfig(QDiffusionConfig):
    """EDA-DM keeps Q-Diffusion's base quantizers (split shortcut, attention at `softmax_bits` = 8)."""

    name = "edadm"
    PRESETS = {
        "paper": {
            "calibration": {"trajectories": 1024, "policy": "tdac", "tdac_lambda": 1.2},
            "reconstruction": {"weight_iters": 5000},
        },
        "fast": {
            "calibration": {"trajectories": 256, "policy": "tdac", "tdac_lambda": 1.2},
            "reconstruction": {"weight_iters": 300},
        },
    }
    PRESETS["deploy"] = {**PRESETS["fast"], **DEPLOY_CHOICES}
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(trajectories=1024, policy="tdac"))
    reconstruction: ReconstructionConfig = field(default_factory=lambda: _edadm_engine(weight_iters=5000))


@register_method(EDADMConfig, summary="EDA-DM: TDAC calibration + fine-grained block reconstruction")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: EDADMConfig, progress: bool = True) -> dict:
    full_precision = full_precision_copy(denoiser)
    splits = skip_concat_splits(denoiser, probe(denoiser, calibration)) if config.split_shortcut else {}
    prepare_model(denoiser, config.layer_policy(), splits)
    units = discover_units(denoiser, probe(denoiser, calibration), block_patterns=config.blocks)
    reconstructor = start_reconstruction(denoiser, full_precision, calibration, config, progress)
    if not config.weight_only:
        reconstructor.run_once(
            "init_activations", lambda: calibrate_ranges(denoiser, calibration, config.batch_size, progress)
        )
    reconstructor.joint_pass(units)
    resumed = finish_reconstruction(reconstructor)
    counts = [int((calibration.step_index == s).sum()) for s in range(calibration.num_steps)]
    return {"units": len(units), "split_shortcuts": sorted(splits), "samples_per_step": counts, **resumed}
