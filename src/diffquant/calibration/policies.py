"""Which sampling steps of which trajectories become calibration samples.

* `UniformSteps` - Q-Diffusion: every trajectory at `count` steps spaced uniformly over the run.
* `AllSteps` - every step of every trajectory (TFMQ-DM's finite-set calibration).
* `SkewNormalSteps` - PTQ4DM's NDTC: one step per trajectory, its time drawn from
  N(mean * T, std * T) (clipped), skewed toward the data end of the trajectory.
* `AllocatedSteps` - explicit per-step sample counts (EDA-DM's TDAC computes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError

Selection = list[tuple[int, int]]  # (trajectory, step index)


@dataclass(frozen=True)
class UniformSteps:
    """Q-Diffusion: `count` steps at a uniform interval over the run (range(0, T, T // count) when
    count divides T; evenly spaced otherwise)."""

    count: int = 25

    def steps(self, num_steps: int) -> list[int]:
        if not 1 <= self.count <= num_steps:
            raise ConfigError(f"UniformSteps.count must be between 1 and the {num_steps} sampling steps.")
        return sorted({(i * num_steps) // self.count for i in range(self.count)})

    def select(self, num_steps: int, timesteps: torch.Tensor, trajectories: int, generator: torch.Generator):
        return [(i, s) for s in self.steps(num_steps) for i in range(trajectories)]

    def describe(self) -> str:
        return f"uniform({self.count} steps)"


@dataclass(frozen=True)
class AllSteps:
    def select(self, num_steps: int, timesteps: torch.Tensor, trajectories: int, generator: torch.Generator):
        return [(i, s) for s in range(num_steps) for i in range(trajectories)]

    def describe(self) -> str:
        return "all steps"


@dataclass(frozen=True)
class SkewNormalSteps:
    """PTQ4DM NDTC: t ~ N(mean * T, std * T), T the training horizon, mapped to the nearest step."""

    mean: float = 0.4
    std: float = 0.4
    train_timesteps: int = 1000

    def select(self, num_steps: int, timesteps: torch.Tensor, trajectories: int, generator: torch.Generator):
        horizon = self.train_timesteps
        draws = torch.randn(trajectories, generator=generator, dtype=torch.float64) * self.std + self.mean
        targets = (draws * horizon).clamp(0, horizon - 1)
        steps = torch.argmin((timesteps.double()[None, :] - targets[:, None]).abs(), dim=1)
        return [(i, int(s)) for i, s in enumerate(steps)]

    def describe(self) -> str:
        return f"skew-normal(mean={self.mean}T, std={self.std}T)"


@dataclass(frozen=True)
class AllocatedSteps:
    """`counts[s]` samples at step s, drawn from distinct trajectories (needs max(counts) trajectories)."""

    counts: tuple[int, ...]

    def select(self, num_steps: int, timesteps: torch.Tensor, trajectories: int, generator: torch.Generator):
        if len(self.counts) != num_steps:
            raise ConfigError(f"AllocatedSteps has {len(self.counts)} counts for {num_steps} sampling steps.")
        if max(self.counts) > trajectories:
            raise ConfigError(f"A step wants {max(self.counts)} samples but only {trajectories} trajectories run.")
        selection = []
        for step, count in enumerate(self.counts):
            chosen = torch.randperm(trajectories, generator=generator)[:count]
            selection.extend((int(i), step) for i in chosen)
        return selection

    def describe(self) -> str:
        return f"allocated({sum(self.counts)} samples)"


TimestepPolicy = UniformSteps | AllSteps | SkewNormalSteps | AllocatedSteps
