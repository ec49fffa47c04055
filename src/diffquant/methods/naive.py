"""Naive post-training quantization: round-to-nearest with observed ranges.

Algorithm:
  1. per-channel symmetric weight grids from min-max (or the MSE shrink-grid search);
  2. per-tensor affine activation ranges observed on calibration data (min-max or MSE);
  3. round to nearest. Every conv and linear layer is quantized, the first and last included.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.engines import calibrate_ranges, prepare_model
from diffquant.errors import ConfigError
from diffquant.methods.base import MethodConfig
from diffquant.methods.registry import register_method
from diffquant.quant import QuantSpec


@dataclass
class NaiveConfig(MethodConfig):
    """Round-to-nearest PTQ; any WxAy, weight-only when abits is None/16/32."""

    name = "naive"
    weight_observer: str = "minmax"
    """minmax or lp (MSE shrink-grid search, p = 2.4)."""
    activation_observer: str = "minmax"
    """minmax, ema, percentile or lp."""

    def validate(self) -> None:
        for field_name in ("weight_observer", "activation_observer"):
            if getattr(self, field_name) not in ("minmax", "ema", "percentile", "lp"):
                raise ConfigError(f"{field_name} must be minmax, ema, percentile or lp.")
        super().validate()

    def weight_spec(self) -> QuantSpec:
        return super().weight_spec().replace(observer=self.weight_observer)

    def activation_spec(self) -> QuantSpec | None:
        spec = super().activation_spec()
        return spec.replace(observer=self.activation_observer) if spec else None


@register_method(NaiveConfig, summary="round-to-nearest PTQ with min-max/MSE observers")
def apply(denoiser: nn.Module, calibration: CalibrationSet, config: NaiveConfig, progress: bool = True) -> dict:
    prepare_model(denoiser, config.layer_policy())
    calibrate_ranges(denoiser, calibration, config.batch_size, progress)
    return {}
