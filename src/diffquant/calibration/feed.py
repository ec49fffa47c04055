"""Run calibration inputs through a model inside the right sampling-step context."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diffquant.calibration.dataset import CalibrationBatch, CalibrationSet
from diffquant.families import denoise
from diffquant.quant import step_context


def call_denoiser(denoiser: torch.nn.Module, batch: CalibrationBatch) -> torch.Tensor:
    """One denoiser call on a calibration batch, by keyword through its family adapter, inside its step context."""
    with step_context(batch.step_index, batch.timestep, batch.num_steps):
        return denoise(denoiser, batch.sample, batch.timesteps, batch.conditioning)


@torch.no_grad()
def feed_calibration(
    denoiser: torch.nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 64,
    description: str = "calibrate",
    progress: bool = True,
    on_batch: Callable[[CalibrationBatch, torch.Tensor], None] | None = None,
) -> None:
    """Call the denoiser on every calibration entry, one sampling step per batch."""
    batches = list(calibration.batches(batch_size))
    for batch in tqdm(batches, desc=description, disable=not progress):
        output = call_denoiser(denoiser, batch)
        if on_batch is not None:
            on_batch(batch, output)
