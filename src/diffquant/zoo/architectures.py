"""The architectures of diffquant's reference models, built from diffusers classes.

Both are small enough to train on a CPU yet hold the structures the quantization methods target:
the UNet has ResNet blocks, self-attention, a time-embedding MLP and decoder skip concatenations;
the DiT has adaLN-Zero modulation, attention and MLP blocks with class conditioning.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiTTransformer2DModel, UNet2DModel

# UNet2DModel, 1.11 M parameters: 28x28 -> 14x14 (self-attention) -> 7x7, mid-block attention.
FMNIST_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}

# DiTTransformer2DModel on pixels, 2.82 M parameters: 4x4 patches (49 tokens), width 128, 8 blocks,
# 10 classes plus the null class that classifier-free guidance uses.
FMNIST_DIT_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_layers": 8,
    "num_embeds_ada_norm": 10,
    "norm_num_groups": 1,
}


def build_unet(config: dict[str, Any] | None = None) -> UNet2DModel:
    return UNet2DModel(**(config or FMNIST_UNET_CONFIG))


def build_dit(config: dict[str, Any] | None = None) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(**(config or FMNIST_DIT_CONFIG))
