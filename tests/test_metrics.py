import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.evaluation import (
    GaussianStats,
    class_accuracy,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)
from diffquant.evaluation.inception import inception_fid


def test_fid_of_a_set_against_itself_is_zero_and_shift_is_squared_norm():
    features = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    stats = GaussianStats.of(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)
    shifted = GaussianStats.of(features + 3.0)
    assert frechet_distance(stats, shifted) == pytest.approx(16 * 9.0, rel=1e-6)


def test_fid_rejects_nan_features():
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(DiffquantError, match="NaN"):
        GaussianStats.of(bad)


def test_inception_score_bounds():
    uniform = torch.zeros(1000, 10)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = torch.full((1000, 10), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 50.0
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-4)


def test_precision_recall_identity_and_disjoint():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=generator)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(500, 8, generator=generator) + 100
    assert precision_recall(real, far) == (0.0, 0.0)


def test_class_accuracy():
    logits = torch.eye(4)
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 0])) == 0.75


def test_psnr_ssim_identities():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 28, 28, generator=generator) * 2 - 1
    assert torch.allclose(psnr(images, images), torch.full((6,), 100.0))
    assert torch.allclose(ssim(images, images), torch.ones(6), atol=1e-6)
    other = images.flip(0)
    assert torch.allclose(ssim(images, other), ssim(other, images))
    assert (ssim(images, other) < 0.5).all()


def test_psnr_of_known_error():
    a = torch.zeros(2, 1, 8, 8)
    b = a + 0.2  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0), atol=1e-4)


def test_psnr_shape_mismatch_is_clear():
    with pytest.raises(DiffquantError, match="one shape"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))


def test_inception_fid_without_weights_says_what_to_do(tmp_path):
    images = torch.zeros(4, 1, 28, 28)
    with pytest.raises(DiffquantError, match="downloads nothing"):
        inception_fid(images, images, None)
    with pytest.raises(DiffquantError, match="inception"):
        inception_fid(images, images, tmp_path / "missing.pth")


def test_gaussian_stats_count():
    stats = GaussianStats.of(np.ones((5, 3)) + np.arange(5)[:, None])
    assert stats.count == 5 and stats.mean.shape == (3,)
