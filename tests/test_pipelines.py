"""Pipelines: calibration recorded by running a tiny random SD3 pipeline, quantized, saved in the
diffusers layout and reloaded in one call with identical images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffquant
from diffquant.errors import ConfigError
from diffquant.methods import make_config
from diffquant.modules import quant_layers
from diffquant.pipelines import generate, model_from_pipeline, record_pipeline_calibration
from tests.pipeline_models import tiny_sd3_pipeline

PROMPTS = ["a shirt", "a sneaker, studio shot", "a photo of a bag"]


@pytest.fixture
def pipeline(tmp_path):
    return tiny_sd3_pipeline(tmp_path / "tok")


def test_calibration_runs_the_pipeline_with_both_cfg_branches(pipeline, tmp_path):
    model = model_from_pipeline(pipeline, "tiny-sd3")
    calibration = record_pipeline_calibration(model, PROMPTS, steps=3, guidance_scale=3.0)
    assert len(calibration) == 3 * 2 * len(PROMPTS)  # steps x CFG branches x prompts
    assert set(calibration.conditioning) == {"encoder_hidden_states", "pooled_projections"}
    assert calibration.steps == [0, 1, 2] and calibration.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    # timesteps are the flow scheduler's (sigma x 1000), decreasing with the step
    per_step = [float(calibration.timestep[calibration.step_index == s][0]) for s in range(3)]
    assert per_step == sorted(per_step, reverse=True) and per_step[0] == pytest.approx(1000.0)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert len(record_pipeline_calibration(model, prompt_file, steps=2)) == 2 * 2 * 2


def test_quantized_pipeline_saves_in_diffusers_layout_and_reloads_identically(pipeline, tmp_path):
    with pytest.raises(ConfigError, match="prompts"):
        diffquant.quantize(pipeline, "naive", progress=False)
    config = make_config(
        "tfmq", wbits=8, abits=8, calibration={"steps": 3}, reconstruction={"weight_iters": 2, "act_iters": 1}
    )
    quantized = diffquant.quantize(
        pipeline, config, progress=False, prompts=PROMPTS, components=("denoiser", "text_encoder")
    )
    assert quantized.pipeline.transformer is quantized.denoiser
    assert quantized.quantization["components"]["text_encoder"]["layers"] > 0
    assert not any(True for _ in quant_layers(pipeline.text_encoder))  # the original pipeline is untouched
    first = generate(quantized, PROMPTS[:2], steps=3, guidance_scale=3.0, seed=5)
    fp = generate(model_from_pipeline(pipeline), PROMPTS[:2], steps=3, guidance_scale=3.0, seed=5)
    assert first.shape == (2, 1, 16, 16) and not torch.equal(first, fp)
    assert (first - fp).abs().mean() < 0.05

    diffquant.save(quantized, tmp_path / "q")
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (tmp_path / "q" / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # untouched: diffusers layout
    assert (tmp_path / "q" / "text_encoder_2" / "model.safetensors").is_file()
    assert (tmp_path / "q" / "text_encoder" / "quantized_component.json").is_file()
    assert (tmp_path / "q" / "transformer" / "quantization.json").is_file()

    reloaded = diffquant.load(tmp_path / "q")
    assert reloaded.pipeline is not None and reloaded.quantization["method"] == "tfmq"
    again = generate(reloaded, PROMPTS[:2], steps=3, guidance_scale=3.0, seed=5)
    assert torch.equal(first, again)
    assert any(True for _ in quant_layers(reloaded.pipeline.text_encoder))


def test_float_pipeline_directory_loads_and_samples_from_the_command_line(pipeline, tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app

    pipeline.save_pretrained(tmp_path / "p")
    model = diffquant.load(tmp_path / "p")
    assert model.pipeline is not None and model.quantization is None and model.adapter.name == "sd3"
    runner = CliRunner()
    args = ["sample", "--model", str(tmp_path / "p"), "-n", "2", "--steps", "2", "--out", str(tmp_path / "s")]
    assert "--prompt" in runner.invoke(app, args).output
    result = runner.invoke(app, [*args, "--prompt", "a shirt", "--prompt", "a bag"])
    assert result.exit_code == 0, result.output
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (2, 1, 16, 16)


def test_flux_pipeline_quantizes_samples_and_reloads_identically(tmp_path):
    from dataclasses import replace

    from tests.pipeline_models import tiny_flux_pipeline

    pipeline = tiny_flux_pipeline(tmp_path / "tok")
    model = model_from_pipeline(pipeline, "tiny-flux")
    model = replace(model, info=replace(model.info, pipeline_kwargs={"max_sequence_length": 16}))
    assert model.adapter.name == "flux"
    config = make_config("naive", wbits=8, abits=8, calibration={"steps": 3})
    quantized = diffquant.quantize(model, config, progress=False, prompts=PROMPTS)
    assert sum(1 for _ in quant_layers(quantized.denoiser)) > 5
    first = generate(quantized, PROMPTS[:2], steps=3, seed=5)
    fp = generate(model, PROMPTS[:2], steps=3, seed=5)
    assert first.shape == fp.shape and first.shape[0] == 2 and torch.isfinite(first).all()
    assert not torch.equal(first, fp) and (first - fp).abs().mean() < 0.05
    diffquant.save(quantized, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    again = generate(diffquant.load(tmp_path / "q"), PROMPTS[:2], steps=3, seed=5)
    assert torch.equal(first, again)
