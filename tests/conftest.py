"""Shared fixtures: tiny models that build or train in seconds, and the Fashion-MNIST skip rule."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffquant.data.fashion_mnist import default_fashion_mnist_dir
from diffquant.zoo.registry import DiffusionModel, ModelInfo

torch.set_num_threads(int(os.environ.get("DIFFQUANT_TEST_THREADS", "1")))

HAVE_FMNIST = (default_fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST and not os.environ.get("CI"), reason="apt-get install -y dataset-fashion-mnist"
)


def tiny_unet_model(seed: int = 0, size: int = 8) -> DiffusionModel:
    """A 2-level UNet2DModel with attention and skip concatenations, for 8x8 digits."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    return DiffusionModel(unet.eval(), ModelInfo("tiny-unet", "unet", (1, size, size)))


def tiny_dit_model(seed: int = 0, size: int = 8) -> DiffusionModel:
    """A 2-block class-conditional DiT on 8x8 pixels (2x2 patches)."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )
    return DiffusionModel(dit.eval(), ModelInfo("tiny-dit", "dit", (1, size, size), num_classes=10, guidance_scale=2.0))


@pytest.fixture
def tiny_unet() -> DiffusionModel:
    return tiny_unet_model()


@pytest.fixture
def tiny_dit() -> DiffusionModel:
    return tiny_dit_model()
