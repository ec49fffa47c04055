"""The quantization core end to end: methods, policies, calibration data, save/load."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

import diffquant
from diffquant.calibration import CalibrationSet, SkewNormalSteps, UniformSteps, record_trajectories
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import make_config
from diffquant.model import DDPM_LINEAR_SCHEDULE
from diffquant.modules import QuantAttnProcessor, attention_processors, quant_layers
from diffquant.quant import step_context
from diffquant.runtime.storage import TENSORS_FILE
from diffquant.sampling import SamplerConfig, sample
from diffquant.zoo import DiffusionModel, ModelInfo
from tests.conftest import relative_error, tiny_dit_model


def model_output(model: DiffusionModel, batch_size: int = 4, seed: int = 0, **conditioning) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *model.info.image_shape), generator=generator)
    with torch.no_grad(), step_context(0, 900, 10):
        return model.denoiser(x, torch.full((batch_size,), 900), **conditioning).sample


@pytest.mark.parametrize("abits", [None, 8])
def test_error_ordering_w8_w4_w2_on_trained_model(trained_unet, calibration, held_out, abits):
    errors = {}
    for wbits in (8, 4, 2):
        quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=wbits, abits=abits)
        errors[wbits] = relative_error(trained_unet, quantized, held_out)
    assert errors[8] < errors[4] < errors[2], errors
    assert errors[8] < 0.01, errors


def test_ptq4dm_keeps_first_and_last_layers_at_8_bits(trained_unet, calibration, held_out):
    quantized = diffquant.quantize(trained_unet, "ptq4dm", calibration, progress=False, wbits=4, abits=8)
    layers = dict(quant_layers(quantized.denoiser))
    assert quantized.quantization["details"] == {"first_layer": "conv_in", "last_layer": "conv_out"}
    for name in ("conv_in", "conv_out"):
        assert layers[name].weight_quantizer.spec.format == "int8"
        assert layers[name].input_quantizer.spec.format == "int8"
        assert layers[name].input_quantizer.spec.observer == "lp"
    assert layers["down_blocks.0.resnets.0.conv1"].weight_quantizer.spec.format == "int4"
    naive = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4, abits=8)
    assert relative_error(trained_unet, quantized, held_out) < relative_error(trained_unet, naive, held_out)


@pytest.mark.parametrize("method,wbits,abits", [("naive", 4, 8), ("naive", 3, None), ("ptq4dm", 8, 8)])
def test_save_load_is_bit_identical(trained_unet, calibration, tmp_path, method, wbits, abits):
    quantized = diffquant.quantize(trained_unet, method, calibration, progress=False, wbits=wbits, abits=abits)
    diffquant.save(quantized, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    assert torch.equal(model_output(quantized), model_output(reloaded))
    assert reloaded.quantization["method"] == method
    assert reloaded.quantization["setting"] == f"W{wbits}A{abits or 16}"


def test_w4_weights_are_eight_times_smaller_on_disk(trained_unet, calibration, tmp_path):
    quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4, abits=None)
    diffquant.save(quantized, tmp_path / "q")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "q" / TENSORS_FILE))
    packed_bytes = sum(v.numel() for k, v in stored.items() if k.endswith(".weight_codes.packed"))
    scale_bytes = sum(
        stored[f"{name}.weight_quantizer.scale"].numel() * 4 for name, _ in quant_layers(quantized.denoiser)
    )
    fp32_bytes = sum(4 * math.prod(layer.weight.shape) for _, layer in quant_layers(quantized.denoiser))
    assert fp32_bytes / packed_bytes == pytest.approx(8.0, rel=0.01)
    assert fp32_bytes / (packed_bytes + scale_bytes) > 7.0


def test_per_step_activation_banks(trained_unet, calibration, tmp_path):
    quantized = diffquant.quantize(
        trained_unet, "naive", calibration, progress=False, wbits=8, abits=4, activation_per_step=True
    )
    layer = dict(quant_layers(quantized.denoiser))["down_blocks.0.resnets.0.conv1"]
    bank = layer.input_quantizer
    assert bank.scale.shape[0] == len(calibration.steps) == 5
    assert torch.equal(
        bank.bank_timesteps, torch.tensor(sorted({float(t) for t in calibration.timestep}, reverse=True))
    )
    x = torch.randn(2, 1, 8, 8)
    outputs = []
    for index in (0, 4):
        with torch.no_grad(), step_context(index, float(bank.bank_timesteps[index]), 10):
            outputs.append(quantized.denoiser(x, torch.full((2,), 500)).sample)
    assert not torch.equal(outputs[0], outputs[1])  # different parameter sets were used
    diffquant.save(quantized, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    reloaded_bank = dict(quant_layers(reloaded.denoiser))["down_blocks.0.resnets.0.conv1"].input_quantizer
    assert torch.equal(reloaded_bank.scale, bank.scale)
    assert torch.equal(reloaded_bank.bank_timesteps, bank.bank_timesteps)
    with torch.no_grad(), step_context(4, float(bank.bank_timesteps[4]), 10):
        assert torch.equal(reloaded.denoiser(x, torch.full((2,), 500)).sample, outputs[1])
    # the sampler sets the context itself, so per-step models sample like any other
    images = sample(reloaded, 2, SamplerConfig("ddim", 10), seed=0, progress=False).images
    assert torch.isfinite(images).all()


def test_pattern_that_matches_nothing_is_an_error(trained_unet, calibration):
    with pytest.raises(ConfigError, match=r"'conv_inn' \(keep_fp\) matches no.*conv_in"):
        diffquant.quantize(trained_unet, "naive", calibration, progress=False, keep_fp=("conv_inn",))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        diffquant.quantize(trained_unet, "naive", calibration, progress=False, keep_fp=("re:conv_(",))


def test_keep_fp_and_include_patterns(trained_unet, calibration):
    quantized = diffquant.quantize(
        trained_unet, "naive", calibration, progress=False, keep_fp=("conv_in", "conv_out", "time_embedding.*")
    )
    names = {name for name, _ in quant_layers(quantized.denoiser)}
    assert not {"conv_in", "conv_out", "time_embedding.linear_1"} & names
    assert "down_blocks.0.resnets.0.conv1" in names
    only = diffquant.quantize(trained_unet, "naive", calibration, progress=False, include=("re:.*resnets.*conv[12]",))
    assert all("resnets" in name for name, _ in quant_layers(only.denoiser))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"wbits": 0}, "wbits must be an integer between 1 and 16"),
        ({"wbits": 17}, "wbits must be an integer between 1 and 16"),
        ({"abits": 20}, "abits must be an integer between 1 and 16"),
        ({"attention_bits": -1}, "attention_bits"),
        ({"weight_format": "int4.5"}, "Unknown number format"),
        ({"colour": "blue"}, "no option"),
    ],
)
def test_bad_settings_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        make_config("naive", **options)


def test_unknown_method_lists_the_known_ones(trained_unet, calibration):
    with pytest.raises(ConfigError, match="Unknown method 'qdiff'.*naive.*ptq4dm"):
        diffquant.quantize(trained_unet, "qdiff", calibration)


def test_nan_in_calibration_data_is_a_clear_error(trained_unet, calibration):
    broken = calibration.subset(torch.arange(len(calibration)))
    broken.sample[3, 0, 0, 0] = float("nan")
    with pytest.raises(DiffquantError, match=r"NaN or Inf in 'sample' \(1 of"):
        diffquant.quantize(trained_unet, "naive", broken, progress=False)
    with pytest.raises(DiffquantError, match="NaN"):
        CalibrationSet(broken.sample, broken.timestep, broken.step_index)


def test_quantizing_a_quantized_model_is_refused(trained_unet, calibration):
    quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False)
    with pytest.raises(DiffquantError, match="already quantized"):
        diffquant.quantize(quantized, "naive", calibration, progress=False)


def test_save_is_atomic(trained_unet, calibration, tmp_path, monkeypatch):
    quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False)
    import diffquant.runtime.storage as storage

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        diffquant.save(quantized, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_file_is_a_clear_error(trained_unet, calibration, tmp_path):
    quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4)
    diffquant.save(quantized, tmp_path / "q")
    tensors = tmp_path / "q" / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(DiffquantError, match="corrupt"):
        diffquant.load(tmp_path / "q")


def test_attention_matmuls_are_quantized(trained_unet, calibration):
    float_matmuls = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=8, abits=8)
    quantized = diffquant.quantize(
        trained_unet, "naive", calibration, progress=False, wbits=8, abits=8, attention_bits=4, softmax_bits=4
    )
    processors = dict(attention_processors(quantized.denoiser))
    assert processors and not dict(attention_processors(float_matmuls.denoiser))
    for processor in processors.values():
        assert all(q.scale is not None for q in processor.quantizers())
        assert processor.probs_quantizer.spec.format == "uint4"
    assert not torch.allclose(model_output(quantized), model_output(float_matmuls))


def test_calibration_recording_policies(trained_unet, tmp_path):
    uniform = record_trajectories(trained_unet, 6, SamplerConfig("ddim", 20), UniformSteps(4), progress=False)
    assert uniform.steps == [0, 5, 10, 15] and len(uniform) == 24
    ndtc = record_trajectories(trained_unet, 200, SamplerConfig("ddim", 20), SkewNormalSteps(), progress=False)
    assert len(ndtc) == 200  # one sample per trajectory
    assert ndtc.timestep.float().mean() < 560  # skewed toward the data end (t = 0)
    ndtc.save(tmp_path / "cal")
    loaded = CalibrationSet.load(tmp_path / "cal")
    assert torch.equal(loaded.sample, ndtc.sample) and loaded.meta["policy"].startswith("skew-normal")


def test_cfg_branches_are_both_recorded():
    model = tiny_dit_model()
    calibration = record_trajectories(
        model, 4, SamplerConfig("ddim", 4, guidance_scale=3.0), UniformSteps(2), progress=False
    )
    labels = calibration.conditioning["class_labels"]
    assert len(calibration) == 16 and (labels == 10).sum() == 8


def test_extra_architecture_unet2dcondition_with_cross_attention(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    model = DiffusionModel(unet, ModelInfo("cond-unet", "UNet2DConditionModel", (2, 8, 8)), dict(DDPM_LINEAR_SCHEDULE))
    generator = torch.Generator().manual_seed(1)
    count = 24
    calibration = CalibrationSet(
        sample=torch.randn(count, 2, 8, 8, generator=generator),
        timestep=torch.tensor([900, 500, 100] * 8),
        step_index=torch.tensor([0, 1, 2] * 8),
        conditioning={"encoder_hidden_states": torch.randn(count, 5, 12, generator=generator)},
        num_steps=3,
    )
    quantized = diffquant.quantize(
        model, "naive", calibration, progress=False, wbits=8, abits=8, attention_bits=8, softmax_bits=8
    )
    processors = dict(attention_processors(quantized.denoiser))
    assert any(name.endswith("attn2.processor") for name in processors)  # cross-attention
    assert all(isinstance(p, QuantAttnProcessor) for p in processors.values())
    assert relative_error(model, quantized, calibration) < 0.01
    diffquant.save(quantized, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    context = torch.randn(2, 5, 12)
    assert torch.equal(
        model_output(quantized, 2, encoder_hidden_states=context),
        model_output(reloaded, 2, encoder_hidden_states=context),
    )
