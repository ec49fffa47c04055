"""UNet2DModel: pixel- or latent-space DDPM UNets, unconditional or class-conditional."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter

UNET_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock", "Attention")


class UNet2DAdapter(FamilyAdapter):
    name = "unet2d"
    model_classes = ("UNet2DModel",)
    sample_arg = "sample"
    conditioning = ("class_labels",)
    blocks = UNET_BLOCKS

    def num_classes(self, config: Any) -> int | None:
        return config.num_class_embeds

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        classes = self.num_classes(denoiser.config)
        return {} if classes is None else {"class_labels": torch.randint(0, classes, (batch,), generator=generator)}
