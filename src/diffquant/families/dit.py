"""DiTTransformer2DModel: class-conditional DiT with adaLN-Zero (label dropout gives the null class)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter


class DiTAdapter(FamilyAdapter):
    name = "dit"
    model_classes = ("DiTTransformer2DModel",)
    conditioning = ("class_labels",)
    blocks = ("BasicTransformerBlock",)

    def num_classes(self, config: Any) -> int | None:
        # DiT's label table holds num_embeds_ada_norm classes plus the CFG null class
        return config.num_embeds_ada_norm

    def example_conditioning(self, denoiser: nn.Module, batch: int, generator: torch.Generator) -> Conditioning:
        classes = self.num_classes(denoiser.config)
        return {"class_labels": torch.randint(0, classes, (batch,), generator=generator)}
