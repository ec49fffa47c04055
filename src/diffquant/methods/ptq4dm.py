"""PTQ4DM (Shang et al., CVPR 2023): post-training quantization on diffusion models.

Algorithm (paper defaults, as in the official script `quant_sample_ddim_in_backward_DNTC.sh`):
  1. NDTC calibration: 1,024 samples, each from its own full-precision trajectory at a step whose
     time t ~ N(0.4 T, 0.4 T) - skewed toward the data end;
  2. per-channel symmetric weights and per-tensor symmetric activations, ranges chosen by the MSE
     of the quantized tensor (Table 4: MSE beats L1, cosine and KL);
  3. the first and last layers at 8 bits; the network output is left unquantized; SiLU, softmax and
     the attention matmuls stay in floating point.
The shipped script does not enable AdaRound, so no reconstruction runs here either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffquant.calibration import CalibrationSet, call_denoiser
from diffquant.engines import calibrate_ranges, prepare_model
from diffquant.methods.base import CalibrationConfig, MethodConfig
from diffquant.methods.registry import register_method
from diffquant.modules import LayerOverride
from diffquant.modules.structure import input_and_output_layers
from diffquant.quant import QuantSpec


@dataclass
class PTQ4DMConfig(MethodConfig):
    name = "ptq4dm"
    first_last_bits: int = 8
    """Weight and activation bits of the first and last layers."""
    mse_norm: float = 2.0
    """p of the Lp range search (2 = MSE)."""
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(trajectories=1024, policy="ndtc", ndtc_mean=0.4, ndtc_std=0.4)
    )

    def weight_spec(self) -> QuantSpec:
        return super().weight_spec().replace(observer="lp", lp_norm=self.mse_norm)

    def activation_spec(self) -> QuantSpec | None:
        if self.weight_only:
            return None
        fmt = self.activation_format or f"int{self.abits}"
        return QuantSpec(fmt, symmetric=True, observer="lp", lp_norm=self.mse_norm, per_step=self.activation_per_step)


@register_method(PTQ4DMConfig, summary="PTQ4DM: NDTC calibration + MSE ranges (CVPR 2023)")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: PTQ4DMConfig, progress: bool = True) -> dict:
    first_batch = next(calibration.batches(min(8, config.batch_size)))
    first, last = input_and_output_layers(denoiser, lambda: call_denoiser(denoiser, first_batch))
    edge_bits = config.first_last_bits
    edges = tuple(LayerOverride(name, weight_bits=edge_bits, activation_bits=edge_bits) for name in (first, last))
    prepare_model(denoiser, config.layer_policy(extra_overrides=edges))
    calibrate_ranges(denoiser, calibration, config.batch_size, progress)
    return {"first_layer": first, "last_layer": last}
