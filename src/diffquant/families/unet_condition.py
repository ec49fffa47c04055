"""UNet2DConditionModel: Stable Diffusion 1.x/2.x (cross-attention on text) and SDXL (plus pooled text
embeddings and size/crop ids through `added_cond_kwargs`)."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, text_embeddings
from diffquant.families.unet import UNET_BLOCKS


class UNet2DConditionAdapter(FamilyAdapter):
    name = "unet2d-condition"
    model_classes = ("UNet2DConditionModel",)
    sample_arg = "sample"
    conditioning = ("encoder_hidden_states", "added_cond_kwargs", "class_labels")
    blocks = UNET_BLOCKS
    conditional_inputs = True

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        config = denoiser.config
        conditioning: Conditioning = {
            "encoder_hidden_states": text_embeddings(batch, 7, config.cross_attention_dim, generator)
        }
        if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            conditioning["added_cond_kwargs"] = {
                "text_embeds": torch.randn((batch, pooled), generator=generator),
                "time_ids": torch.randint(0, 64, (batch, 6), generator=generator).float(),
            }
        return conditioning
