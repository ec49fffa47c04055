"""Q-Diffusion (Li et al., ICCV 2023): post-training quantization for diffusion models.

Algorithm (official defaults; `paper` preset, `fast` for CPUs, `deploy` = `fast` with symmetric weights
and float attention matmuls, which run on the fused int8 path: see DEPLOY_CHOICES):
  1. timestep-aware calibration: `cali_n` trajectories x `cali_st` steps at a uniform interval;
  2. split-shortcut quantization: the shortcut conv of every decoder ResNet block, fed by the
     concatenation [deep features, encoder skip], gets separate activation and weight quantizers for
     the two halves;
  3. per-channel asymmetric weights (MSE init), per-tensor activations (MSE init, p = 2.4), and the
     attention matmuls QK^T and softmax-V quantized (softmax output at `softmax_bits`);
  4. BRECQ block reconstruction: AdaRound weights with activation quantization off, then activation
     step sizes with it on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.engines import calibrate_ranges, discover_units, prepare_model, probe
from diffquant.methods.reconstruction_base import (
    ReconstructionMethodConfig,
    finish_reconstruction,
    full_precision_copy,
    start_reconstruction,
)
from diffquant.methods.registry import register_method
from diffquant.modules.structure import skip_concat_splits
from diffquant.quant import QuantSpec

DEPLOY_CHOICES = {"weight_symmetric": True, "quantize_attention": False, "softmax_bits": None}
"""The `deploy` preset's departures from the paper: the two choices that keep a model off the fused int8
path. Asymmetric 8-bit weights do not fit int8, so every GEMM needs a zero-point correction pass after it
(no GELU or requantization in its epilogue); quantized attention matmuls need the score matrix spelled
out instead of the fused SDPA kernel. On the fmnist DiT (one thread, W8A8) taking both back moves the
deployed model from 0.68x to 0.89-0.95x PT2E's speed, as fast as ptq4dm (docs/DEPLOYMENT.md)."""


@dataclass
class QDiffusionConfig(ReconstructionMethodConfig):
    name = "qdiffusion"
    PRESETS = {
        "paper": {
            "calibration": {"trajectories": 256, "policy": "uniform", "uniform_steps": 20},
            "reconstruction": {"weight_iters": 20000, "act_iters": 5000, "batch_size": 32, "act_lr": 4e-5},
        },
        "fast": {
            "calibration": {"trajectories": 32, "policy": "uniform", "uniform_steps": 10},
            "reconstruction": {
                "weight_iters": 400,
                "weight_lr": 1e-2,
                "act_iters": 100,
                "batch_size": 32,
                "act_lr": 4e-4,
            },
        },
    }
    PRESETS["deploy"] = {**PRESETS["fast"], **DEPLOY_CHOICES}
    softmax_bits: int | None = 8
    """Bits of the post-softmax probabilities (Q-Diffusion's sm_abit; 16 for Stable Diffusion)."""
    quantize_attention: bool = True
    """Quantize Q, K, V at the attention matmuls with the activation bits."""
    split_shortcut: bool = True
    weight_symmetric: bool = False
    """The paper uses asymmetric weights; symmetric weights can run on the int8 kernels."""

    def weight_spec(self) -> QuantSpec:
        return super().weight_spec().replace(symmetric=self.weight_symmetric, observer="lp", lp_norm=2.4)

    def activation_spec(self) -> QuantSpec | None:
        spec = super().activation_spec()
        return spec.replace(observer="lp", lp_norm=2.4) if spec else None

    def attention_spec(self) -> QuantSpec | None:
        if not self.quantize_attention or self.weight_only:
            return None
        bits = self.attention_bits or self.abits
        return QuantSpec(f"int{bits}", symmetric=self.attention_symmetric, observer="lp", lp_norm=2.4)


@register_method(QDiffusionConfig, summary="Q-Diffusion: split shortcut + BRECQ reconstruction (ICCV 2023)")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: QDiffusionConfig, progress: bool = True) -> dict:
    full_precision = full_precision_copy(denoiser)
    splits = skip_concat_splits(denoiser, probe(denoiser, calibration)) if config.split_shortcut else {}
    prepare_model(denoiser, config.layer_policy(), splits)
    units = discover_units(denoiser, probe(denoiser, calibration), block_patterns=config.blocks)
    reconstructor = start_reconstruction(denoiser, full_precision, calibration, config, progress)
    reconstructor.weight_pass(units)
    if not config.weight_only:
        reconstructor.run_once(
            "init_activations", lambda: calibrate_ranges(denoiser, calibration, config.batch_size, progress)
        )
        reconstructor.activation_pass(units)
    resumed = finish_reconstruction(reconstructor)
    return {"units": len(units), "split_shortcuts": sorted(splits), **resumed}
