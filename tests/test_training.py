import torch

from diffquant.data import load_digits
from diffquant.training import TrainConfig, train_model
from diffquant.training.trainer import _denoiser_loss
from diffquant.zoo import load_model
from tests.conftest import tiny_dit_model, tiny_unet_model


def _loss(model, data, seed=123):
    with torch.no_grad():
        return _denoiser_loss(model, data.images[:512], data.labels[:512], torch.Generator().manual_seed(seed)).item()


def test_tiny_model_learns_in_seconds(tmp_path):
    data = load_digits()
    model = tiny_unet_model()
    before = _loss(model, data)
    result = train_model(
        model,
        data,
        TrainConfig(steps=60, batch_size=64, learning_rate=2e-3, warmup_steps=5, checkpoint_every=30, ema_decay=0.9),
        tmp_path,
        progress=False,
    )
    after = _loss(model, data)
    assert result.steps == 60
    assert after < 0.6 * before, (before, after)
    reloaded = load_model(tmp_path / "model")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    assert torch.equal(reloaded.denoiser(x, t).sample, model.denoiser(x, t).sample)


def test_resumed_training_equals_uninterrupted(tmp_path):
    data = load_digits()
    config = TrainConfig(steps=12, batch_size=32, checkpoint_every=6, warmup_steps=2)
    straight = tiny_dit_model()
    train_model(straight, data, config, tmp_path / "straight", progress=False)

    interrupted = tiny_dit_model()
    half = TrainConfig(**{**config.__dict__, "steps": 6})
    train_model(interrupted, data, half, tmp_path / "resumed", progress=False)
    resumed = tiny_dit_model(seed=99)  # a fresh process: different init, state comes from the checkpoint
    train_model(resumed, data, config, tmp_path / "resumed", progress=False)

    for (name, a), (_, b) in zip(
        straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
