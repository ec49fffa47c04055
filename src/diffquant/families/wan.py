"""Wan 2.x video (WanTransformer3DModel): latents (C, F, H, W), 3D rotary patches, cross-attention."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, repeated_blocks, text_embeddings


class WanAdapter(FamilyAdapter):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    conditioning = ("encoder_hidden_states", "encoder_hidden_states_image")
    blocks = repeated_blocks(WanTransformer3DModel, ("WanTransformerBlock",))
    flow_matching = True
    conditional_inputs = True

    def latent_shape(self, config: Any) -> tuple[int, ...]:
        return (config.in_channels, 21, 60, 104)  # WanPipeline's default 81 frames at 480x832

    def example_inputs(self, denoiser: nn.Module, batch: int, generator: torch.Generator):
        pt, ph, pw = denoiser.config.patch_size
        latents = torch.randn((batch, denoiser.config.in_channels, 2 * pt, 4 * ph, 4 * pw), generator=generator)
        timestep = torch.randint(1, 1000, (batch,), generator=generator).float()
        return latents, timestep, self.example_conditioning(denoiser, batch, generator)

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        return {"encoder_hidden_states": text_embeddings(batch, 7, denoiser.config.text_dim, generator)}
