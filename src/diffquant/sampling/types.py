"""What sampling takes and gives: the sampler settings, the per-step hook's view and the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffquant.errors import ConfigError

# name -> (scheduler class, overrides of the training noise schedule for sampling)
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {"clip_sample": True}),
    "ddim": (DDIMScheduler, {"clip_sample": True, "set_alpha_to_one": False, "steps_offset": 1}),
    # x0 thresholding keeps the multistep solvers stable on small models (see cpu_feasibility.md).
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "thresholding": True}),
    "deis": (DEISMultistepScheduler, {"thresholding": True}),
    "euler": (EulerDiscreteScheduler, {}),
    # rectified flow (SD3, Flux, Wan, Qwen-Image, Sana): the only sampler of a flow-matching model
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
}
FLOW_SCHEDULERS = ("flow-euler",)


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: scheduler name, number of steps, guidance scale and DDIM eta."""

    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float | None = None
    """Classifier-free guidance scale; None uses the model's default (1.0 = no guidance)."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic)."""

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"Unknown scheduler '{self.scheduler}'. Choose one of: {', '.join(SCHEDULERS)}.")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps must be between 1 and 1000, got {self.steps}.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {self.guidance_scale}.")


@dataclass
class StepInfo:
    """What a hook sees before one denoiser evaluation."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    sample: torch.Tensor
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    unconditional: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 1.0
    batch_start: int = 0


StepHook = Callable[[StepInfo], None]


@dataclass
class SampleResult:
    images: torch.Tensor
    labels: torch.Tensor | None
    config: SamplerConfig
    seed: int
