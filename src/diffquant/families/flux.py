"""Flux (FluxTransformer2DModel): 2x2-packed latent tokens with rotary position ids, dual-stream
blocks then single-stream blocks, optional guidance embedding (guidance-distilled checkpoints).

The model multiplies timestep and guidance by 1000 itself, so it is called with t / 1000. Both
block classes return (encoder_hidden_states, hidden_states): the image stream is second.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, repeated_blocks, square_side, text_embeddings

DEFAULT_LATENT_SIDE = 128  # FluxPipeline's default_sample_size: 1024 px through the 8x VAE


def latent_ids(height: int, width: int) -> torch.Tensor:
    """(row, column) position ids of a height x width token grid, as Flux's rotary embedding reads them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    tokens = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_2x2(tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    channels, height, width = latent_shape
    grid = tokens.view(tokens.shape[0], height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(tokens.shape[0], channels, height, width)


class FluxAdapter(FamilyAdapter):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    conditioning = ("encoder_hidden_states", "pooled_projections", "guidance")
    blocks = repeated_blocks(FluxTransformer2DModel, ("FluxTransformerBlock", "FluxSingleTransformerBlock"))
    image_stream = {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}
    flow_matching = True
    timestep_scale = 1e-3
    conditional_inputs = True

    def latent_shape(self, config: Any) -> tuple[int, ...]:
        return (config.in_channels // 4, DEFAULT_LATENT_SIDE, DEFAULT_LATENT_SIDE)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_2x2(latents)

    def unpack(self, sample: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return unpack_2x2(sample, latent_shape)

    def extra_inputs(self, denoiser: nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        side = square_side(sample.shape[1], "Flux")
        text_tokens = conditioning["encoder_hidden_states"].shape[1]
        extra: Conditioning = {
            "img_ids": latent_ids(side, side).to(sample.dtype),
            "txt_ids": torch.zeros(text_tokens, 3, dtype=sample.dtype),
        }
        if denoiser.config.guidance_embeds and "guidance" not in conditioning:
            extra["guidance"] = torch.full((sample.shape[0],), 3.5)  # FluxPipeline's default guidance
        return extra

    def example_inputs(self, denoiser: nn.Module, batch: int, generator: torch.Generator):
        channels = denoiser.config.in_channels // 4
        latents = torch.randn((batch, channels, 8, 8), generator=generator)  # a small square grid
        timestep = torch.randint(1, 1000, (batch,), generator=generator).float()
        return self.pack(latents), timestep, self.example_conditioning(denoiser, batch, generator)

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        config = denoiser.config
        conditioning: Conditioning = {
            "encoder_hidden_states": text_embeddings(batch, 7, config.joint_attention_dim, generator),
            "pooled_projections": torch.randn((batch, config.pooled_projection_dim), generator=generator),
        }
        if config.guidance_embeds:
            conditioning["guidance"] = torch.full((batch,), 3.5)
        return conditioning
