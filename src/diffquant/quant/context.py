"""The sampling-step context: which denoising step the model is evaluating right now.

diffquant's sampler sets it before every denoiser call; per-step quantizers (TFMQ-DM, EfficientDM,
DGQ) read it to pick their parameter set. Code that runs a quantized model with its own loop wraps
each call in `step_context(index, timestep, num_steps)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class StepState:
    index: int
    timestep: float
    num_steps: int


_CURRENT: ContextVar[StepState | None] = ContextVar("diffquant_step", default=None)


def current_step() -> StepState | None:
    return _CURRENT.get()


@contextmanager
def step_context(index: int, timestep: float, num_steps: int) -> Iterator[StepState]:
    """Run the enclosed denoiser calls as sampling step `index` (timestep value `timestep`)."""
    state = StepState(int(index), float(timestep), int(num_steps))
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)
