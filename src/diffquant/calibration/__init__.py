"""Calibration data: trajectory recording, timestep-selection policies, feeding."""

from diffquant.calibration.dataset import (
    CalibrationBatch,
    CalibrationSet,
    flatten_conditioning,
    select_rows,
    unflatten_conditioning,
)
from diffquant.calibration.feed import call_denoiser, feed_calibration
from diffquant.calibration.policies import AllocatedSteps, AllSteps, SkewNormalSteps, TimestepPolicy, UniformSteps
from diffquant.calibration.recorder import record_trajectories

__all__ = [
    "AllSteps",
    "AllocatedSteps",
    "CalibrationBatch",
    "CalibrationSet",
    "SkewNormalSteps",
    "TimestepPolicy",
    "UniformSteps",
    "call_denoiser",
    "feed_calibration",
    "flatten_conditioning",
    "record_trajectories",
    "select_rows",
    "unflatten_conditioning",
]
