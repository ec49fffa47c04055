"""Record full-precision sampling trajectories into a `CalibrationSet`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from diffquant.calibration.dataset import CalibrationSet, flatten_conditioning, unflatten_conditioning
from diffquant.calibration.policies import TimestepPolicy, UniformSteps
from diffquant.errors import ConfigError
from diffquant.model import DiffusionModel
from diffquant.sampling import SamplerConfig, StepInfo, make_scheduler, sample


def record_trajectories(
    model: DiffusionModel,
    num_trajectories: int = 256,
    sampler: SamplerConfig | None = None,
    policy: TimestepPolicy | None = None,
    seed: int = 1234,
    batch_size: int = 128,
    progress: bool = True,
    first_index: int = 0,
    count: int | None = None,
    prompts: Sequence[str] | None = None,
) -> CalibrationSet:
    """Sample `num_trajectories` images with the full-precision model and keep the denoiser inputs at
    the (trajectory, step) pairs chosen by `policy`. With classifier-free guidance the conditional and
    unconditional branches are both kept (the set doubles), as Q-Diffusion does for Stable Diffusion.

    The seed differs from the evaluation protocol's seed by default, so calibration never sees the
    evaluation's initial noise. `first_index`/`count` record only trajectories first_index.. of the set
    (one process's share, see diffquant.distributed). A pipeline model runs its pipeline on `prompts`
    (or on its class prompts).
    """
    sampler = sampler or SamplerConfig("ddim", 25)
    policy = policy or UniformSteps(min(25, sampler.steps))
    if num_trajectories <= 0:
        raise ConfigError(f"num_trajectories must be positive, got {num_trajectories}.")
    timesteps = make_scheduler(model, sampler).timesteps
    selection = policy.select(sampler.steps, timesteps, num_trajectories, torch.Generator().manual_seed(seed))
    wanted: dict[int, set[int]] = defaultdict(set)
    for trajectory, step in selection:
        wanted[step].add(trajectory)

    records: dict[str, list[torch.Tensor]] = defaultdict(list)
    conditioning: dict[str, list[torch.Tensor]] = defaultdict(list)

    def keep(info: StepInfo) -> None:
        rows = [i for i in range(info.sample.shape[0]) if info.batch_start + i in wanted.get(info.index, ())]
        if not rows:
            return
        index = torch.tensor(rows)
        branches = [info.conditioning] + ([info.unconditional] if info.unconditional is not None else [])
        for branch in branches:
            records["sample"].append(info.sample[index].clone())
            records["timestep"].append(info.timestep.expand(len(rows)).clone())
            records["step_index"].append(torch.full((len(rows),), info.index, dtype=torch.long))
            for key, value in flatten_conditioning(branch).items():
                conditioning[key].append(value[index].clone())

    count = num_trajectories - first_index if count is None else count
    sample(
        model, count, sampler, seed, batch_size, hooks=[keep], progress=progress, first_index=first_index,
        prompts=prompts,
    )
    calibration = CalibrationSet(
        torch.cat(records["sample"]),
        torch.cat(records["timestep"]),
        torch.cat(records["step_index"]),
        unflatten_conditioning({k: torch.cat(v) for k, v in conditioning.items()}),
        num_steps=sampler.steps,
        meta={
            "model": model.info.name,
            "scheduler": sampler.scheduler,
            "steps": sampler.steps,
            "guidance_scale": sampler.guidance_scale,
            "policy": policy.describe(),
            "trajectories": num_trajectories,
            "seed": seed,
        },
    )
    return calibration
