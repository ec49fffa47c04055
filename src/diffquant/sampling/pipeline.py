"""Seeded sampling through a diffusers pipeline (its text encoders, scheduler and decoder).

A pipeline model samples like a bare denoiser: the same seed gives the same images whatever the batch
size (the initial latents come from one generator for the whole set and are passed to the pipeline),
class labels become the model's class prompts, and step hooks see every denoiser call - split into its
conditional and unconditional halves when the pipeline batches both guidance branches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from diffquant.errors import ConfigError, DiffquantError
from diffquant.families import adapter_for
from diffquant.families.base import batched_only, select_rows
from diffquant.model import DiffusionModel
from diffquant.quant.context import _CURRENT, StepState
from diffquant.sampling.types import SamplerConfig, SampleResult, StepHook, StepInfo

DENOISER_COMPONENTS = ("transformer", "unet")


def denoiser_component(pipeline: Any) -> str:
    """The pipeline's denoiser slot: 'transformer' (DiT-style pipelines) or 'unet'."""
    for name in DENOISER_COMPONENTS:
        if getattr(pipeline, name, None) is not None:
            return name
    raise DiffquantError(f"{type(pipeline).__name__} has no 'transformer' or 'unet' component to quantize.")


def pipeline_of(model: DiffusionModel) -> Any:
    """The model's pipeline with the model's own denoiser in it (a quantized or exported copy runs, not
    the float denoiser the pipeline was loaded with)."""
    pipeline = model.pipeline
    if pipeline is None:
        raise DiffquantError(f"Model '{model.info.name}' has no pipeline; load or build it from a diffusers pipeline.")
    name = denoiser_component(pipeline)
    if getattr(pipeline, name) is not model.denoiser:
        pipeline = type(pipeline)(**{**pipeline.components, name: model.denoiser})
    pipeline.set_progress_bar_config(disable=True)  # diffquant shows its own bar over the whole set
    return pipeline


@contextmanager
def pipeline_steps(denoiser: torch.nn.Module, num_steps: int) -> Iterator[list[int]]:
    """Number the denoiser's calls as sampling steps while a pipeline runs (per-step quantizers read it);
    one call per step, both CFG branches in one batch, as diffusers pipelines do."""
    calls: list[int] = []
    tokens: list[Any] = []
    adapter = adapter_for(denoiser)

    def before(_module, _args, kwargs):
        timestep = kwargs.get(adapter.timestep_arg)
        value = float(timestep.flatten()[0]) / adapter.timestep_scale if torch.is_tensor(timestep) else 0.0
        tokens.append(_CURRENT.set(StepState(len(calls) % num_steps, value, num_steps)))
        calls.append(len(calls))

    def after(_module, _args, _kwargs, _output):
        _CURRENT.reset(tokens.pop())

    handles = [
        denoiser.register_forward_pre_hook(before, with_kwargs=True),
        denoiser.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def prompts_for(model: DiffusionModel, labels: torch.Tensor | None, prompts: Sequence[str] | None, count: int):
    """One prompt per sample: the given prompts repeated to fill `count`, else the class prompts of `labels`."""
    if prompts:
        return [prompts[i % len(prompts)] for i in range(count)]
    if labels is not None and model.info.class_prompts:
        return [model.info.class_prompts[int(label)] for label in labels]
    raise ConfigError(
        f"Model '{model.info.name}' is a text-to-image pipeline: give prompts (a list, or --prompt on the CLI)."
    )


def _step_hook(model: DiffusionModel, hooks: Sequence[StepHook], state: dict[str, Any]):
    """A denoiser pre-hook that turns each pipeline call into a StepInfo for the sampler's hooks."""
    adapter = model.adapter

    def before(_module, _args, kwargs):
        sample = kwargs[adapter.sample_arg]
        rows = state["rows"]
        timestep = kwargs[adapter.timestep_arg]
        value = timestep.flatten()[0] / adapter.timestep_scale if torch.is_tensor(timestep) else torch.tensor(0.0)
        conditioning = batched_only(
            {k: v for k, v in kwargs.items() if k in adapter.conditioning and v is not None}, sample.shape[0]
        )
        # diffusers pipelines batch guidance as [unconditional, conditional]
        guided = sample.shape[0] == 2 * rows
        conditional = select_rows(conditioning, slice(rows, None)) if guided else conditioning
        unconditional = select_rows(conditioning, slice(0, rows)) if guided else None
        info = StepInfo(
            state["calls"] % state["steps"],
            state["steps"],
            value.reshape(()),
            sample[rows:] if guided else sample,
            conditional,
            unconditional,
            state["guidance"],
            state["batch_start"],
        )
        state["calls"] += 1
        for hook in hooks:
            hook(info)

    return before


@torch.no_grad()
def sample_pipeline(
    model: DiffusionModel,
    num_samples: int,
    config: SamplerConfig,
    seed: int = 0,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = True,
    first_index: int = 0,
) -> SampleResult:
    """`num_samples` images in [-1, 1] from the model's pipeline with its own scheduler; see module doc."""
    pipeline = pipeline_of(model)
    guidance = model.info.guidance_scale if config.guidance_scale is None else config.guidance_scale
    texts = prompts_for(model, labels, prompts, num_samples)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((first_index + num_samples, *model.info.image_shape), generator=generator)[first_index:]
    scale = getattr(pipeline, "vae_scale_factor", 1)
    height, width = (size * scale for size in model.info.image_shape[-2:])
    state = {"rows": 0, "calls": 0, "steps": config.steps, "guidance": guidance, "batch_start": 0}
    handle = model.denoiser.register_forward_pre_hook(_step_hook(model, hooks, state), with_kwargs=True)
    images = []
    bar = tqdm(total=num_samples, desc=f"sample {model.info.name}", disable=not progress)
    try:
        with pipeline_steps(model.denoiser, config.steps):
            for start in range(0, num_samples, batch_size):
                rows = slice(start, start + batch_size)
                latents = model.adapter.pack(noise[rows].clone())
                state.update(rows=latents.shape[0], calls=0, batch_start=first_index + start)
                output = pipeline(
                    texts[rows],
                    num_inference_steps=config.steps,
                    guidance_scale=guidance,
                    latents=latents,
                    height=height,
                    width=width,
                    generator=torch.Generator().manual_seed(seed * 1_000_003 + first_index + start + 1),
                    output_type="pt",
                    **model.info.pipeline_kwargs,
                )
                images.append(output.images * 2.0 - 1.0)  # pipelines return [0, 1]
                bar.update(latents.shape[0])
    finally:
        handle.remove()
        bar.close()
    return SampleResult(torch.cat(images), labels, config, seed)


__all__ = ["denoiser_component", "pipeline_of", "pipeline_steps", "prompts_for", "sample_pipeline"]
