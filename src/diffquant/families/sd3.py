"""SD3 / SD3.5 (SD3Transformer2DModel, MMDiT): joint text-image attention blocks.

`JointTransformerBlock` returns (encoder_hidden_states, hidden_states): the image stream is second.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, text_embeddings


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    conditioning = ("encoder_hidden_states", "pooled_projections")
    blocks = ("JointTransformerBlock", "SD3SingleTransformerBlock")
    image_stream = {"JointTransformerBlock": 1}
    flow_matching = True
    conditional_inputs = True

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        config = denoiser.config
        return {
            "encoder_hidden_states": text_embeddings(batch, 7, config.joint_attention_dim, generator),
            "pooled_projections": torch.randn((batch, config.pooled_projection_dim), generator=generator),
        }
