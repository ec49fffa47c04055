"""Shared fixtures: tiny models that build or train in seconds, and the Fashion-MNIST skip rule."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffquant.data.fashion_mnist import default_fashion_mnist_dir
from diffquant.model import DDPM_LINEAR_SCHEDULE, DiffusionModel, ModelInfo

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
    return DiffusionModel(unet.eval(), ModelInfo("tiny-unet", "unet", (1, size, size)), dict(DDPM_LINEAR_SCHEDULE))


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
    info = ModelInfo("tiny-dit", "dit", (1, size, size), num_classes=10, guidance_scale=2.0)
    return DiffusionModel(dit.eval(), info, dict(DDPM_LINEAR_SCHEDULE))


def affine_8bit_layer(kind: str):
    """A linear or conv QuantLayer with affine 8-bit weights and inputs, calibrated on random inputs and
    frozen, whose zero-points leave int8 once folded in (so a kernel needs the weight-shift correction);
    returns (layer, its input)."""
    from torch import nn

    from diffquant.modules import QuantConv2d, QuantLinear
    from diffquant.quant import QuantSpec
    from diffquant.runtime.kernels import int8_weight

    torch.manual_seed(0)
    weight_spec = QuantSpec("uint8", granularity="per_channel", symmetric=False)
    input_spec = QuantSpec("uint8", symmetric=False)
    if kind == "linear":
        layer, x = QuantLinear(nn.Linear(6, 10), weight_spec, input_spec), torch.randn(32, 6) * 2
    else:
        layer = QuantConv2d(nn.Conv2d(6, 10, 3, stride=2, padding=1), weight_spec, input_spec)
        x = torch.randn(4, 6, 9, 9) * 2 + 0.5
    layer.calibrate_weight()
    layer.input_quantizer.start_observing()
    layer(x)
    layer.input_quantizer.finish_observing()
    layer.freeze()
    layer.weight_quantizer.zero_point[::2] = 190.0
    assert int8_weight(layer).input_sum_weight is not None
    return layer, x


@pytest.fixture
def tiny_unet() -> DiffusionModel:
    return tiny_unet_model()


@pytest.fixture
def tiny_dit() -> DiffusionModel:
    return tiny_dit_model()


@pytest.fixture(scope="session")
def trained_unet(tmp_path_factory) -> DiffusionModel:
    """A tiny UNet really trained on the 8x8 digits for a few seconds."""
    from diffquant.data import load_digits
    from diffquant.training import TrainConfig, train_model

    model = tiny_unet_model()
    config = TrainConfig(
        steps=80, batch_size=64, learning_rate=2e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=80
    )
    train_model(model, load_digits(), config, tmp_path_factory.mktemp("train"), progress=False)
    return model


@pytest.fixture(scope="session")
def calibration(trained_unet):
    from diffquant.calibration import UniformSteps, record_trajectories
    from diffquant.sampling import SamplerConfig

    return record_trajectories(trained_unet, 32, SamplerConfig("ddim", 10), UniformSteps(5), seed=1, progress=False)


@pytest.fixture(scope="session")
def held_out(trained_unet):
    from diffquant.calibration import UniformSteps, record_trajectories
    from diffquant.sampling import SamplerConfig

    return record_trajectories(trained_unet, 16, SamplerConfig("ddim", 10), UniformSteps(5), seed=99, progress=False)


def relative_error(reference: DiffusionModel, candidate: DiffusionModel, data) -> float:
    """Output MSE of `candidate` relative to `reference` over calibration-style inputs."""
    from diffquant.quant import step_context

    errors, norms = 0.0, 0.0
    with torch.no_grad():
        for batch in data.batches(64):
            with step_context(batch.step_index, batch.timestep, batch.num_steps):
                a = reference.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
                b = candidate.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
            errors += (a - b).pow(2).sum().item()
            norms += a.pow(2).sum().item()
    return errors / norms
