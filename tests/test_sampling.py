import numpy as np
import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.sampling import SCHEDULERS, SamplerConfig, sample, save_image_grid, save_samples

SCHEDULER_NAMES = ["ddpm", "ddim", "dpm++", "deis"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_fixed_seed_gives_identical_images(tiny_unet, scheduler):
    config = SamplerConfig(scheduler, steps=6)
    first = sample(tiny_unet, 6, config, seed=3, batch_size=4, progress=False).images
    second = sample(tiny_unet, 6, config, seed=3, batch_size=4, progress=False).images
    other = sample(tiny_unet, 6, config, seed=4, batch_size=4, progress=False).images
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    assert first.shape == (6, 1, 8, 8) and first.abs().max() <= 1.0


def test_deterministic_sampler_does_not_depend_on_batch_size(tiny_unet):
    config = SamplerConfig("ddim", steps=5)
    whole = sample(tiny_unet, 6, config, seed=1, batch_size=6, progress=False).images
    split = sample(tiny_unet, 6, config, seed=1, batch_size=2, progress=False).images
    assert (whole - split).abs().max() < 1e-3  # only float rounding of different batch shapes differs


def test_step_hook_sees_every_step_in_order(tiny_unet):
    seen = []
    sample(
        tiny_unet,
        3,
        SamplerConfig("dpm++", steps=7),
        seed=0,
        batch_size=3,
        progress=False,
        hooks=[lambda info: seen.append((info.index, int(info.timestep), info.num_steps, info.sample.shape[0]))],
    )
    assert [s[0] for s in seen] == list(range(7))
    assert all(s[2] == 7 and s[3] == 3 for s in seen)
    timesteps = [s[1] for s in seen]
    assert timesteps == sorted(timesteps, reverse=True)


def test_conditional_hook_carries_labels_and_null_branch(tiny_dit):
    infos = []
    result = sample(
        tiny_dit,
        4,
        SamplerConfig("ddim", steps=3, guidance_scale=3.0),
        seed=0,
        labels=[1, 2, 3, 4],
        progress=False,
        hooks=[infos.append],
    )
    assert result.labels.tolist() == [1, 2, 3, 4]
    assert infos[0].conditioning["class_labels"].tolist() == [1, 2, 3, 4]
    assert infos[0].unconditional["class_labels"].tolist() == [10] * 4


def test_guidance_changes_conditional_samples(tiny_dit):
    plain = sample(tiny_dit, 4, SamplerConfig("ddim", 4, guidance_scale=1.0), seed=0, progress=False).images
    guided = sample(tiny_dit, 4, SamplerConfig("ddim", 4, guidance_scale=4.0), seed=0, progress=False).images
    assert not torch.allclose(plain, guided)


def test_bad_sampler_settings_are_clear(tiny_unet):
    with pytest.raises(ConfigError, match="Unknown scheduler 'plms'"):
        sample(tiny_unet, 2, SamplerConfig("plms"), progress=False)
    with pytest.raises(ConfigError, match="steps"):
        sample(tiny_unet, 2, SamplerConfig("ddim", steps=0), progress=False)
    with pytest.raises(ConfigError, match="unconditional"):
        sample(tiny_unet, 2, SamplerConfig("ddim", 2), labels=[0, 1], progress=False)


def test_outputs_written(tiny_dit, tmp_path):
    result = sample(tiny_dit, 5, SamplerConfig("ddim", 2), seed=0, progress=False)
    grid = save_image_grid(result.images, tmp_path / "grid.png", columns=5)
    npz = save_samples(result, tmp_path / "samples.npz")
    assert grid.stat().st_size > 0
    payload = np.load(npz)
    assert payload["images"].shape == (5, 1, 8, 8) and payload["images"].dtype == np.uint8
    assert payload["labels"].tolist() == [0, 1, 2, 3, 4]


def test_scheduler_registry_has_the_required_families():
    assert {"ddpm", "ddim", "dpm++", "deis"} <= set(SCHEDULERS)
