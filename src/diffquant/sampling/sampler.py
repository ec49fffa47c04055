"""Seeded sampling from any diffquant model over diffusers schedulers.

The loop calls every hook once per denoiser evaluation with a `StepInfo` (step index, timestep,
the input x_t and the conditioning); calibration recorders and per-step quantizers use it instead of
a hand-edited sampling loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffquant.data.images import to_uint8
from diffquant.errors import ConfigError
from diffquant.families.base import select_rows
from diffquant.fileio import atomic_file
from diffquant.model import DiffusionModel
from diffquant.quant.context import step_context
from diffquant.sampling.pipeline import sample_pipeline
from diffquant.sampling.types import (
    FLOW_SCHEDULERS,
    SCHEDULERS,
    SamplerConfig,
    SampleResult,
    StepHook,
    StepInfo,
)


def is_flow_model(model: DiffusionModel) -> bool:
    return "FlowMatch" in str(model.scheduler_config.get("_class_name", "")) or model.adapter.flow_matching


def scheduler_name(model: DiffusionModel, config: SamplerConfig) -> str:
    """The scheduler that runs: a flow-matching model samples with its flow scheduler whatever DDPM-family
    name the config gives (calibration presets default to "ddim")."""
    if is_flow_model(model) and config.scheduler not in FLOW_SCHEDULERS:
        return "flow-euler"
    if not is_flow_model(model) and config.scheduler in FLOW_SCHEDULERS:
        raise ConfigError(f"Model '{model.info.name}' is not a flow-matching model; choose a DDPM-family scheduler.")
    return config.scheduler


def make_scheduler(model: DiffusionModel, config: SamplerConfig):
    """A diffusers scheduler built from the model's training noise schedule."""
    config.validate()
    scheduler_class, overrides = SCHEDULERS[scheduler_name(model, config)]
    scheduler = scheduler_class.from_config({**model.scheduler_config, **overrides})
    if getattr(scheduler.config, "use_dynamic_shifting", False):  # Flux: shift grows with the token count
        tokens = math.prod(model.info.image_shape[-2:]) // 4
        base, top = scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len
        slope = (scheduler.config.max_shift - scheduler.config.base_shift) / (top - base)
        scheduler.set_timesteps(config.steps, mu=scheduler.config.base_shift + slope * (tokens - base))
    else:
        scheduler.set_timesteps(config.steps)
    return scheduler


def default_labels(model: DiffusionModel, count: int) -> torch.Tensor | None:
    """Balanced class labels 0, 1, ..., K-1, 0, ... for a conditional model; None otherwise."""
    if not model.info.conditional:
        return None
    return torch.arange(count) % model.info.num_classes


def _concat(first: dict, second: dict) -> dict:
    return {k: _concat(v, second[k]) if isinstance(v, dict) else torch.cat([v, second[k]]) for k, v in first.items()}


def _predict_noise(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    conditioning: dict,
    unconditional: dict | None,
    guidance: float,
) -> torch.Tensor:
    """The model's prediction by keyword through its family adapter, with classifier-free guidance
    (both branches in one batch) when `unconditional` is given and the scale is not 1."""
    timesteps = t.expand(x.shape[0])
    if unconditional is None or guidance == 1.0:
        return model.adapter.call(model.denoiser, x, timesteps, conditioning)
    both = model.adapter.call(
        model.denoiser, torch.cat([x, x]), torch.cat([timesteps, timesteps]), _concat(conditioning, unconditional)
    )
    conditional, unconditional_prediction = both.chunk(2)
    return unconditional_prediction + guidance * (conditional - unconditional_prediction)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    num_samples: int,
    config: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    labels: torch.Tensor | Sequence[int] | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = True,
    conditioning: dict | None = None,
    unconditional: dict | None = None,
    first_index: int = 0,
    prompts: Sequence[str] | None = None,
) -> SampleResult:
    """Generate `num_samples` images (in [-1, 1] for pixel models that clip); the same seed gives
    identical images.

    The initial noise of sample i does not depend on `batch_size`: it is drawn from one generator
    for the whole set, so two models sampled with one seed start from the same x_T. Text-conditioned
    families take `conditioning` (e.g. prompt embeddings, one row per sample) and, for classifier-free
    guidance, `unconditional` (the empty prompt's); class-conditional models take `labels`. `first_index`
    makes this call samples first_index.. of a larger set (one process's share in distributed sampling).
    A model with a pipeline samples through it (`prompts`, or the class prompts of `labels`).
    """
    config = config or SamplerConfig()
    config.validate()
    if num_samples <= 0 or batch_size <= 0:
        raise ConfigError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}.")
    guidance = model.info.guidance_scale if config.guidance_scale is None else config.guidance_scale
    if labels is None:
        labels = default_labels(model, first_index + num_samples)
        labels = None if labels is None else labels[first_index:]
    elif not model.info.conditional:
        raise ConfigError(f"Model '{model.info.name}' is unconditional: it takes no class labels.")
    else:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (num_samples,) or labels.min() < 0 or labels.max() >= model.info.num_classes:
            raise ConfigError(
                f"labels must be {num_samples} class indices in [0, {model.info.num_classes}), "
                f"got shape {tuple(labels.shape)}."
            )

    if model.pipeline is not None:
        return sample_pipeline(
            model, num_samples, config, seed, batch_size, labels, prompts, hooks, progress, first_index
        )
    if conditioning is None and model.adapter.conditional_inputs:
        raise ConfigError(
            f"Model '{model.info.name}' ({model.adapter.name}) needs conditioning inputs "
            f"({', '.join(model.adapter.conditioning)}); pass conditioning=, or sample its pipeline."
        )
    if labels is not None:
        conditioning = {"class_labels": labels}
        if guidance != 1.0:
            unconditional = {"class_labels": torch.full_like(labels, model.info.num_classes)}  # label-dropout class
    conditioning = conditioning or {}

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((first_index + num_samples, *model.info.image_shape), generator=generator)[first_index:]
    model.denoiser.eval()
    outputs = []
    batches = range(0, num_samples, batch_size)
    scheduler = make_scheduler(model, config)
    name = scheduler_name(model, config)
    clip = bool(model.scheduler_config.get("clip_sample", False))
    bar = tqdm(total=len(batches) * config.steps, desc=f"sample {model.info.name}", disable=not progress)
    for start in batches:
        rows = slice(start, start + batch_size)
        x = model.adapter.pack(noise[rows].clone())
        batch_conditioning = select_rows(conditioning, rows)
        batch_unconditional = None if unconditional is None else select_rows(unconditional, rows)
        scheduler = make_scheduler(model, config)  # fresh multistep state per batch
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at unit noise
        step_generator = torch.Generator().manual_seed(seed * 1_000_003 + first_index + start + 1)
        for index, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            if hooks:
                info = StepInfo(
                    index,
                    config.steps,
                    t,
                    model_input,
                    batch_conditioning,
                    batch_unconditional,
                    guidance,
                    first_index + start,
                )
                for hook in hooks:
                    hook(info)
            with step_context(index, float(t), config.steps):  # per-step quantizers read it
                prediction = _predict_noise(model, model_input, t, batch_conditioning, batch_unconditional, guidance)
            kwargs = {"eta": config.eta} if name == "ddim" else {}
            if name in ("ddpm", "ddim", "euler"):
                kwargs["generator"] = step_generator
            x = scheduler.step(prediction, t, x, **kwargs).prev_sample
            bar.update(1)
        x = model.adapter.unpack(x, model.info.image_shape)
        outputs.append(x.clamp(-1, 1) if clip else x)
    bar.close()
    return SampleResult(torch.cat(outputs), labels, config, seed)


def save_samples(result: SampleResult, npz_path: str | Path) -> Path:
    """Write samples as uint8 images (N, C, H, W) plus labels and the sampler settings to .npz."""
    payload = {
        "images": to_uint8(result.images).numpy(),
        "scheduler": np.array(result.config.scheduler),
        "steps": np.array(result.config.steps),
        "seed": np.array(result.seed),
    }
    if result.labels is not None:
        payload["labels"] = result.labels.numpy()
    with atomic_file(npz_path) as scratch, open(scratch, "wb") as handle:
        np.savez_compressed(handle, **payload)
    return Path(npz_path)
