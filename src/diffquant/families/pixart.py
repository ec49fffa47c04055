"""PixArt-alpha/sigma (PixArtTransformer2DModel) and Sana (SanaTransformer2DModel): text-conditioned
DiTs with cross-attention; PixArt takes resolution/aspect-ratio ids in `added_cond_kwargs`."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, bare_model, text_embeddings


class PixArtAdapter(FamilyAdapter):
    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    conditioning = ("encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs")
    blocks = ("BasicTransformerBlock",)
    conditional_inputs = True

    def extra_inputs(self, denoiser: nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        if "added_cond_kwargs" in conditioning:
            return {}
        model = bare_model(denoiser)  # through deployment wrappers
        if model.use_additional_conditions:  # 1024px PixArt-alpha: the pipeline's resolution ids
            height, width = sample.shape[-2:]
            scale = 8  # VAE downsampling of the pipelines PixArt ships with
            resolution = torch.tensor([[height * scale, width * scale]], dtype=sample.dtype).repeat(sample.shape[0], 1)
            aspect = torch.tensor([[height / width]], dtype=sample.dtype).repeat(sample.shape[0], 1)
            return {"added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect}}
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        width = denoiser.config.caption_channels
        return {"encoder_hidden_states": text_embeddings(batch, 7, width, generator)}


class SanaAdapter(FamilyAdapter):
    name = "sana"
    model_classes = ("SanaTransformer2DModel",)
    conditioning = ("encoder_hidden_states", "encoder_attention_mask")
    blocks = ("SanaTransformerBlock",)
    flow_matching = True
    conditional_inputs = True

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        width = denoiser.config.caption_channels
        return {"encoder_hidden_states": text_embeddings(batch, 7, width, generator)}
