"""What diffquant needs to know about a denoiser family, declared in one place per family.

An adapter says how to call the denoiser (by keyword, never positionally), which conditioning inputs
it takes, the shape of its latent input and how it is packed into tokens, which modules are its
repeated blocks (the reconstruction units) and which output of a block carries the image stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

Conditioning = dict[str, Any]
"""Keyword inputs besides the sample and timestep: tensors with a batch dimension, or dicts of them."""


def select_rows(conditioning: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """The rows `index` of every tensor in (nested) conditioning."""
    return {k: select_rows(v, index) if isinstance(v, dict) else v[index] for k, v in conditioning.items()}


def batched_only(conditioning: Conditioning, count: int) -> Conditioning:
    """The (nested) conditioning tensors with `count` rows; the rest (shared ids, shapes, flags) dropped."""
    kept: Conditioning = {}
    for key, value in conditioning.items():
        if isinstance(value, dict):
            if value := batched_only(value, count):
                kept[key] = value
        elif torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == count:
            kept[key] = value
    return kept


def class_names(module: nn.Module) -> set[str]:
    """The names of a module's class and its bases (so a subclass matches its family's blocks)."""
    return {klass.__name__ for klass in type(module).__mro__}


class FamilyAdapter:
    """The calling convention and structure of one family of diffusers denoisers."""

    name: ClassVar[str] = "generic"
    model_classes: ClassVar[tuple[str, ...]] = ()
    """diffusers model classes this adapter serves."""
    sample_arg: ClassVar[str] = "hidden_states"
    timestep_arg: ClassVar[str] = "timestep"
    conditioning: ClassVar[tuple[str, ...]] = ()
    """Conditioning keywords the denoiser takes from the user or pipeline (batched)."""
    blocks: ClassVar[tuple[str, ...]] = ()
    """Classes of the repeated blocks reconstructed as one unit each (outermost match wins)."""
    image_stream: ClassVar[dict[str, int]] = {}
    """For blocks that return a tuple: the index of the image-stream tensor in it."""
    flow_matching: ClassVar[bool] = False
    """Trained with rectified flow (velocity prediction, FlowMatchEulerDiscreteScheduler)."""
    timestep_scale: ClassVar[float] = 1.0
    """The denoiser takes the scheduler's timestep times this (Flux and Qwen-Image take t / 1000)."""
    conditional_inputs: ClassVar[bool] = False
    """Sampling needs conditioning (text embeddings) that only the user or a pipeline can give."""
    takes_return_dict: ClassVar[bool] = True
    """forward() has diffusers' `return_dict` switch (plain nn.Modules usually do not)."""

    # calling -------------------------------------------------------------------------------------
    def extra_inputs(self, denoiser: nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        """Inputs derived from the others (position ids, image shapes), not stored in calibration data."""
        return {}

    def call_arguments(
        self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
    ) -> dict[str, Any]:
        """The keyword arguments of one denoiser call (what `call` passes)."""
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        if self.timestep_scale != 1.0:
            timestep = timestep.float() * self.timestep_scale
        kwargs = {self.sample_arg: sample, self.timestep_arg: timestep, **conditioning}
        kwargs.update(self.extra_inputs(denoiser, sample, conditioning))
        if self.takes_return_dict:
            kwargs["return_dict"] = False
        return kwargs

    def call(
        self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """One denoiser evaluation by keyword; returns the prediction tensor."""
        output = denoiser(**self.call_arguments(denoiser, sample, timestep, conditioning))
        return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)

    # shapes --------------------------------------------------------------------------------------
    def latent_shape(self, config: Any) -> tuple[int, ...]:
        """(C, H, W) of one unpacked denoiser input, read from the model config."""
        size = getattr(config, "sample_size", None) or 64
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, height, width)

    def num_classes(self, config: Any) -> int | None:
        """The number of class labels a class-conditional model takes (None: not class-conditional)."""
        return None

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents (B, *latent_shape) to the denoiser's sample layout."""
        return latents

    def unpack(self, sample: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return sample

    # structure -----------------------------------------------------------------------------------
    def find_blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Named repeated blocks, outermost first (a block inside another block belongs to it)."""
        wanted = set(self.blocks)
        taken: list[str] = []
        for name, module in model.named_modules():
            if not name or not (class_names(module) & wanted):
                continue
            if any(name.startswith(other + ".") for other in taken):
                continue
            taken.append(name)
            yield name, module

    def block_output(self, module: nn.Module, output: Any) -> torch.Tensor:
        """The image-stream tensor of a block's (or layer's) output."""
        if torch.is_tensor(output):
            return output
        if isinstance(output, (tuple, list)):
            index = next((self.image_stream[c] for c in class_names(module) if c in self.image_stream), None)
            if index is not None:
                return output[index]
            tensors = [item for item in output if torch.is_tensor(item)]
            if tensors:
                return tensors[0]
        if hasattr(output, "sample"):
            return output.sample
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, which holds no tensor")

    # examples ------------------------------------------------------------------------------------
    def example_inputs(
        self, denoiser: nn.Module, batch: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Random inputs of the right shapes (sample, timestep, conditioning), e.g. for agreement probes."""
        latents = torch.randn((batch, *self.latent_shape(denoiser.config)), generator=generator)
        timestep = torch.randint(1, 1000, (batch,), generator=generator)
        if self.flow_matching:
            timestep = timestep.float()
        return self.pack(latents), timestep, self.example_conditioning(denoiser, batch, generator)

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "sample": self.sample_arg,
            "timestep": self.timestep_arg,
            "conditioning": list(self.conditioning),
            "blocks": list(self.blocks),
            "flow_matching": self.flow_matching,
        }


def repeated_blocks(model_class: type, fallback: tuple[str, ...]) -> tuple[str, ...]:
    """diffusers' own list of a model class's repeated blocks (`_repeated_blocks`), else `fallback`."""
    return tuple(getattr(model_class, "_repeated_blocks", None) or fallback)


def text_embeddings(batch: int, tokens: int, width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((batch, tokens, width), generator=generator)


def square_side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{what}: {tokens} image tokens are not a square grid; pass a square latent")
    return side


def wrapped_model(module: nn.Module) -> nn.Module | None:
    """The model inside a deployment wrapper (runtime.export.DeployedDenoiser, the openvino backend's
    runner, a peer's graph wrapper: `.inner`) or a torch.compile wrapper (`._orig_mod`)."""
    for attribute in ("inner", "_orig_mod"):
        if isinstance(inner := getattr(module, attribute, None), nn.Module):
            return inner
    return None


def bare_model(module: nn.Module) -> nn.Module:
    """The model under every deployment and compile wrapper around it."""
    while (inner := wrapped_model(module)) is not None:
        module = inner
    return module
