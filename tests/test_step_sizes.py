"""Learned activation step sizes stay positive (issue 20): LSQ in log space, checks before save."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel

import diffquant
from diffquant.errors import DiffquantError
from diffquant.methods import make_config
from diffquant.model import DDPM_LINEAR_SCHEDULE, DiffusionModel, ModelInfo
from diffquant.quant import Quantizer, QuantSpec, invalid_step_sizes, require_valid_step_sizes


def _learnable_quantizer(initial_scale: float) -> Quantizer:
    quantizer = Quantizer(QuantSpec("uint8", symmetric=True))
    quantizer.calibrate_static(torch.tensor([0.0, 255 * initial_scale]))
    quantizer.set_learnable(True)
    return quantizer


def test_a_step_size_pushed_hard_towards_zero_stays_positive():
    quantizer = _learnable_quantizer(3e-4)  # a post-softmax range over a few hundred tokens
    optimizer = torch.optim.Adam(quantizer.trainable_step_sizes(), lr=0.5)
    probs = torch.rand(4, 256).softmax(-1)
    for _ in range(200):  # a loss whose gradient always asks for a smaller step size
        loss = quantizer.current_params(probs.reshape(1, -1))[0].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    quantizer.set_learnable(False)
    assert quantizer.scale.item() > 0
    assert invalid_step_sizes(quantizer) == []


def test_learnable_round_trip_keeps_the_value_and_the_state_dict_key():
    quantizer = _learnable_quantizer(0.01)
    assert quantizer.scale is None and quantizer.log_scale is not None
    assert quantizer.step_size().item() == pytest.approx(0.01, rel=1e-6)
    quantizer.set_learnable(False)
    assert "scale" in quantizer.state_dict() and "log_scale" not in quantizer.state_dict()
    assert quantizer.scale.item() == pytest.approx(0.01, rel=1e-6)


def test_lsq_gradient_scale_is_one_over_sqrt_n_qp():
    quantizer = _learnable_quantizer(0.01)
    view = torch.rand(1, 100)
    quantizer.current_params(view)[0].sum().backward()
    # d exp(u) / du = exp(u) = s, times LSQ's g = 1 / sqrt(N * Q_P) with N = 100, Q_P = 255
    assert quantizer.log_scale.grad.item() == pytest.approx(0.01 / math.sqrt(100 * 255), rel=1e-4)


def test_a_model_with_a_non_positive_step_size_is_never_saved(tiny_unet, tmp_path):
    config = make_config("naive", wbits=8, abits=8, calibration={"trajectories": 2, "steps": 4, "uniform_steps": 2})
    quantized = diffquant.quantize(tiny_unet, config, progress=False)
    name, quantizer = next(
        (n, m) for n, m in quantized.denoiser.named_modules() if isinstance(m, Quantizer) and m.scale is not None
    )
    quantizer.scale.view(-1)[0] = -1e-3
    with pytest.raises(DiffquantError, match=name):
        require_valid_step_sizes(quantized.denoiser, "check")
    with pytest.raises(DiffquantError, match="non-positive step size"):
        diffquant.save(quantized, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _attention_unet() -> DiffusionModel:
    """16x16 input with self-attention at full resolution: 256 attention tokens."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    return DiffusionModel(unet.eval(), ModelInfo("attn256-unet", "unet", (1, 16, 16)), dict(DDPM_LINEAR_SCHEDULE))


def _psnr_against(reference: DiffusionModel, candidate: DiffusionModel) -> float:
    generator = torch.Generator().manual_seed(123)
    sample = torch.randn(16, 1, 16, 16, generator=generator)
    timesteps = torch.randint(0, 1000, (16,), generator=generator)
    with torch.no_grad():
        expected = reference.denoiser(sample, timesteps).sample
        actual = candidate.denoiser(sample, timesteps).sample
    return 10 * math.log10(expected.pow(2).mean().item() / (actual - expected).pow(2).mean().item())


@pytest.mark.slow
def test_learned_step_sizes_on_many_attention_tokens_stay_positive_and_match_naive():
    """EDA-DM's fast step-size rate (5e-4) drove post-softmax step sizes negative here (12 dB vs naive 29.5 dB)."""
    model = _attention_unet()
    calibration = {"trajectories": 6, "uniform_steps": 4, "steps": 8, "policy": "uniform"}
    naive = diffquant.quantize(model, make_config("naive", wbits=8, abits=8, calibration=calibration), progress=False)
    config = make_config(
        "edadm", wbits=8, abits=8, calibration=calibration, reconstruction={"weight_iters": 40, "act_lr": 5e-4}
    )
    learned = diffquant.quantize(model, config, progress=False)
    assert invalid_step_sizes(learned.denoiser) == []
    probs = [m for n, m in learned.denoiser.named_modules() if n.endswith("probs_quantizer")]
    assert probs and all(float(q.scale.min()) > 0 for q in probs)
    assert _psnr_against(model, learned) > _psnr_against(model, naive) - 1.0
