"""Pipeline models sample, calibrate, save and benchmark like bare denoisers: class labels become the
model's class prompts, the seed fixes the images whatever the batch size, and peers call by keyword."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffquant
from diffquant.bench.peers import _feed, _KeywordGraph, _Positional, get_peer
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import make_config
from diffquant.pipelines import model_from_pipeline
from diffquant.sampling import SamplerConfig, sample
from tests.conftest import tiny_dit_model, tiny_unet_model
from tests.pipeline_models import tiny_sd3_pipeline

CLASS_PROMPTS = ("a shirt", "a sneaker", "a bag")


@pytest.fixture
def model(tmp_path):
    plain = model_from_pipeline(tiny_sd3_pipeline(tmp_path / "tok"), "tiny-sd3")
    info = dataclasses.replace(plain.info, num_classes=3, guidance_scale=2.0, class_prompts=CLASS_PROMPTS)
    return dataclasses.replace(plain, info=info)


def test_labels_become_class_prompts_and_the_batch_size_does_not_change_the_images(model):
    config = SamplerConfig(steps=3)
    whole = sample(model, 4, config, seed=3, batch_size=4, progress=False)
    split = sample(model, 4, config, seed=3, batch_size=1, progress=False)
    assert whole.images.shape == (4, 1, 16, 16) and torch.equal(whole.labels, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(whole.images, split.images, atol=1e-5, rtol=0)
    # sample 3 is prompted like sample 0 (class 0) but starts from other noise
    prompted = sample(model, 1, config, seed=3, prompts=[CLASS_PROMPTS[1]], progress=False)
    first_two = sample(model, 2, config, seed=3, progress=False)
    torch.testing.assert_close(prompted.images[0], first_two.images[0], atol=1e-1, rtol=0)  # same noise
    assert not torch.allclose(prompted.images[0], first_two.images[0], atol=1e-5)  # other prompt


def test_a_pipeline_without_class_prompts_asks_for_prompts(tmp_path):
    plain = model_from_pipeline(tiny_sd3_pipeline(tmp_path / "tok"), "tiny-sd3")
    assert plain.info.guidance_scale == 7.0  # the pipeline's own default
    with pytest.raises(ConfigError, match="give prompts"):
        sample(plain, 2, SamplerConfig(steps=2), progress=False)


def test_step_hooks_see_both_guidance_branches_of_each_pipeline_call(model):
    seen = []
    sample(model, 2, SamplerConfig(steps=3), seed=0, hooks=[seen.append], progress=False)
    assert [info.index for info in seen] == [0, 1, 2]
    first = seen[0]
    assert first.sample.shape[0] == 2 and first.unconditional is not None and first.guidance_scale == 2.0
    assert set(first.conditioning) == {"encoder_hidden_states", "pooled_projections"}
    assert not torch.equal(first.conditioning["encoder_hidden_states"], first.unconditional["encoder_hidden_states"])
    assert float(seen[0].timestep) > float(seen[-1].timestep)


def test_a_class_prompted_pipeline_records_the_methods_own_calibration_set_and_keeps_its_info(model, tmp_path):
    config = make_config("naive", wbits=8, abits=8, calibration={"trajectories": 3, "steps": 3, "uniform_steps": 3})
    calibration = diffquant.record_calibration(model, config, progress=False, use_cache=False)
    assert len(calibration) == 3 * 3 * 2  # trajectories x steps x guidance branches
    quantized = diffquant.quantize(model, config, calibration, progress=False)  # no prompts needed
    diffquant.save(quantized, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    assert reloaded.info.class_prompts == CLASS_PROMPTS and reloaded.info.guidance_scale == 2.0
    before = sample(quantized, 2, SamplerConfig(steps=3), seed=1, progress=False).images
    after = sample(reloaded, 2, SamplerConfig(steps=3), seed=1, progress=False).images
    assert torch.equal(before, after)


def test_peer_wrappers_call_a_joint_attention_model_by_keyword(model):
    denoiser = model.denoiser
    generator = torch.Generator().manual_seed(0)
    x, t, conditioning = model.adapter.example_inputs(denoiser, 2, generator)
    keys = ("encoder_hidden_states", "pooled_projections")
    reference = model.adapter.call(denoiser, x, t, conditioning)
    positional = _Positional(denoiser, keys)
    torch.testing.assert_close(positional(x, t, *(conditioning[k] for k in keys)), reference)
    wrapped = _KeywordGraph(positional, denoiser, keys)
    assert diffquant.families.adapter_for(wrapped).name == "sd3" and wrapped.config is denoiser.config
    torch.testing.assert_close(model.adapter.call(wrapped, x, t, conditioning), reference)
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda _m, _a, kw: calls.append(sorted(kw)), with_kwargs=True)
    _feed(denoiser, [(x, t, conditioning)])
    handle.remove()
    assert "encoder_hidden_states" in calls[0] and "hidden_states" in calls[0]


@pytest.mark.slow
@pytest.mark.skipif(get_peer("pt2e").unavailable() is not None, reason="PT2E needs torchao")
@pytest.mark.parametrize("family", ["sd3", "dit", "unet"])
def test_pt2e_peer_exports_each_family_with_its_inputs(model, family):
    """PT2E exports the denoiser behind a positional signature: text inputs (SD3), class labels (DiT), none."""
    chosen = {"sd3": model, "dit": tiny_dit_model(), "unet": tiny_unet_model()}[family]
    generator = torch.Generator().manual_seed(0)
    x, t, conditioning = chosen.adapter.example_inputs(chosen.denoiser, 4, generator)
    if family == "dit":
        conditioning = {"class_labels": torch.arange(4) % chosen.info.num_classes}
    t = t.float()
    result = get_peer("pt2e").quantize(chosen.denoiser, "W8A8", [(x, t, conditioning)])
    with torch.no_grad():
        reference = chosen.adapter.call(chosen.denoiser, x, t, conditioning)
        output = chosen.adapter.call(result.denoiser, x, t, conditioning)
    relative = float((output - reference).pow(2).mean() / reference.pow(2).mean())
    assert output.shape == reference.shape and 0 < relative < 0.05


def test_a_corrupt_model_description_in_a_pipeline_directory_is_one_clear_error(tmp_path):
    tiny_sd3_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "p")
    for text in ("{not json", '{"name": "x"}'):  # bad JSON; a description without its image shape
        (tmp_path / "p" / "diffquant.json").write_text(text)
        with pytest.raises(DiffquantError, match="diffquant.json|not valid"):
            diffquant.load(tmp_path / "p")
