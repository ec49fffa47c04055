"""Sampling over diffusers schedulers with a per-step hook, PNG grids and .npz outputs."""

from diffquant.sampling.grid import image_grid, save_image_grid
from diffquant.sampling.sampler import (
    SCHEDULERS,
    SamplerConfig,
    SampleResult,
    StepInfo,
    make_scheduler,
    sample,
    save_samples,
)

__all__ = [
    "SCHEDULERS",
    "SampleResult",
    "SamplerConfig",
    "StepInfo",
    "image_grid",
    "make_scheduler",
    "sample",
    "save_image_grid",
    "save_samples",
]
