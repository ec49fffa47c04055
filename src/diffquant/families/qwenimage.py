"""Qwen-Image (QwenImageTransformer2DModel): MMDiT on 2x2-packed latent tokens, called with t / 1000
and the per-sample latent grid sizes (`img_shapes`); blocks return (text, image) streams."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, repeated_blocks, square_side, text_embeddings
from diffquant.families.flux import pack_2x2, unpack_2x2


class QwenImageAdapter(FamilyAdapter):
    name = "qwenimage"
    model_classes = ("QwenImageTransformer2DModel",)
    conditioning = ("encoder_hidden_states", "encoder_hidden_states_mask")
    blocks = repeated_blocks(QwenImageTransformer2DModel, ("QwenImageTransformerBlock",))
    image_stream = {"QwenImageTransformerBlock": 1}
    flow_matching = True
    timestep_scale = 1e-3
    conditional_inputs = True

    def latent_shape(self, config: Any) -> tuple[int, ...]:
        return (config.in_channels // 4, 128, 128)  # QwenImagePipeline's 1024 px through the 8x VAE

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_2x2(latents)

    def unpack(self, sample: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return unpack_2x2(sample, latent_shape)

    def extra_inputs(self, denoiser: nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        side = square_side(sample.shape[1], "Qwen-Image")
        return {"img_shapes": [[(1, side, side)]] * sample.shape[0]}

    def example_inputs(self, denoiser: nn.Module, batch: int, generator: torch.Generator):
        latents = torch.randn((batch, denoiser.config.in_channels // 4, 8, 8), generator=generator)
        timestep = torch.randint(1, 1000, (batch,), generator=generator).float()
        return self.pack(latents), timestep, self.example_conditioning(denoiser, batch, generator)

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        width = denoiser.config.joint_attention_dim
        return {
            "encoder_hidden_states": text_embeddings(batch, 7, width, generator),
            "encoder_hidden_states_mask": torch.ones(batch, 7),
        }
