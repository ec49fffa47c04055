"""The reconstruction engine and the methods built on it (Q-Diffusion, TFMQ-DM, EDA-DM)."""

import copy

import pytest
import torch

import diffquant
from diffquant.calibration import AllSteps, CalibrationSet, record_trajectories
from diffquant.calibration.tdac import tdac_counts
from diffquant.engines import ReconstructionConfig, Reconstructor, discover_units, prepare_model, probe
from diffquant.engines.capture import capture_unit
from diffquant.engines.reconstruction import lp_loss
from diffquant.errors import ConfigError
from diffquant.methods import make_config
from diffquant.modules import quant_layers
from diffquant.modules.layers import SplitQuantConv2d
from diffquant.quant import QuantSpec, step_context
from diffquant.quant.adaround import rectified_sigmoid
from diffquant.sampling import SamplerConfig
from tests.conftest import relative_error

FAST = {"reconstruction": {"weight_iters": 60, "act_iters": 20}}


def block_error(model, fp, calibration, unit_name) -> float:
    data = capture_unit(model, fp, unit_name, calibration, asym=True)  # the inputs it is optimised for
    rows = data.store.rows(torch.arange(len(data.store)))
    args, kwargs = data.call_inputs(rows)
    with torch.no_grad():
        output = model.get_submodule(unit_name)(*args, **kwargs)
    return lp_loss(output, rows["out"], 2.0).item()


def test_adaround_lowers_block_error_below_nearest_rounding(trained_unet, calibration):
    full_precision = copy.deepcopy(trained_unet.denoiser)
    model = copy.deepcopy(trained_unet.denoiser)
    policy = make_config("naive", wbits=3, abits=None).layer_policy()
    prepare_model(model, policy)
    unit = next(u for u in discover_units(model, probe(model, calibration)) if u.name == "down_blocks.0.resnets.0")
    nearest = block_error(model, full_precision, calibration, unit.name)
    config = ReconstructionConfig(weight_iters=800, weight_lr=1e-2, batch_size=32)
    Reconstructor(model, full_precision, calibration, config, progress=False).weight_pass([unit])
    learned = block_error(model, full_precision, calibration, unit.name)
    assert learned < 0.8 * nearest, (nearest, learned)
    for name in unit.layers:
        layer = model.get_submodule(name)
        h = rectified_sigmoid(layer.rounding.alpha)
        assert not layer.rounding.soft
        assert ((h < 0.05) | (h > 0.95)).float().mean() > 0.95  # the regulariser drove h to {0, 1}


def quantize_killed(model, method, calibration, checkpoint_dir, after_units, monkeypatch, **options) -> None:
    """Quantize with `method` and kill the run (KeyboardInterrupt) once `after_units` units are checkpointed."""
    original = Reconstructor.mark_done
    calls = {"count": 0}

    def crash(self, key):
        original(self, key)
        calls["count"] += 1
        if calls["count"] == after_units:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Reconstructor, "mark_done", crash)
    with pytest.raises(KeyboardInterrupt):
        diffquant.quantize(model, method, calibration, progress=False, checkpoint_dir=str(checkpoint_dir), **options)
    monkeypatch.setattr(Reconstructor, "mark_done", original)


def test_resumed_run_equals_uninterrupted(trained_unet, calibration, tmp_path, monkeypatch):
    options = dict(wbits=4, abits=8, preset="fast", **FAST)
    straight = diffquant.quantize(
        trained_unet, "qdiffusion", calibration, progress=False, checkpoint_dir=str(tmp_path / "a"), **options
    )
    assert not any((tmp_path / "a").iterdir())  # a finished run removes its checkpoint

    quantize_killed(trained_unet, "qdiffusion", calibration, tmp_path / "b", 5, monkeypatch, **options)
    checkpoints = list((tmp_path / "b").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "progress.json").is_file()

    resumed_units = []
    original_optimize = Reconstructor._optimize
    monkeypatch.setattr(
        Reconstructor,
        "_optimize",
        lambda self, unit, *a, **k: resumed_units.append(unit.name) or original_optimize(self, unit, *a, **k),
    )
    resumed = diffquant.quantize(
        trained_unet, "qdiffusion", calibration, progress=False, checkpoint_dir=str(tmp_path / "b"), **options
    )
    assert resumed_units.count("conv_in") == 1  # its finished weight pass was not redone, only the activation pass
    # the reported calibration time includes the five units the killed process had finished
    details = resumed.quantization["details"]
    assert "resumed_units" not in straight.quantization["details"]
    assert details["resumed_units"] == 5 and details["earlier_runs_s"] > 0
    assert resumed.quantization["calibration_wall_time_s"] >= details["earlier_runs_s"]
    x = calibration.sample[:6]
    t = calibration.timestep[:6]
    with torch.no_grad(), step_context(0, float(t[0]), 10):
        assert torch.equal(straight.denoiser(x, t).sample, resumed.denoiser(x, t).sample)


def test_split_shortcut_quantizes_the_two_halves_separately(trained_unet, calibration):
    quantized = diffquant.quantize(trained_unet, "qdiffusion", calibration, progress=False, wbits=4, abits=8, **FAST)
    splits = {n: m for n, m in quantized.denoiser.named_modules() if isinstance(m, SplitQuantConv2d)}
    assert set(splits) == set(quantized.quantization["details"]["split_shortcuts"]) and splits
    conv = torch.nn.Conv2d(6, 4, 1)
    split = SplitQuantConv2d(conv, 2, QuantSpec("int8", granularity="per_channel"), QuantSpec("uint8", symmetric=False))
    for half in (split.low, split.high):
        half.calibrate_weight()
        half.input_quantizer.start_observing()
    x = torch.cat([torch.rand(8, 2, 5, 5) * 0.01, torch.rand(8, 4, 5, 5) * 10.0], dim=1)
    with torch.no_grad():
        reference = conv(x)
        split(x)
    split.low.input_quantizer.finish_observing()
    split.high.input_quantizer.finish_observing()
    assert split.low.input_quantizer.scale.item() == pytest.approx(0.01 / 255, rel=0.05)
    assert split.high.input_quantizer.scale.item() == pytest.approx(10.0 / 255, rel=0.05)
    with torch.no_grad():
        assert torch.allclose(split(x), reference, atol=0.05 * reference.abs().max())


def test_tfmq_per_step_parameters_survive_save_and_load(trained_unet, tmp_path):
    calibration = record_trajectories(trained_unet, 16, SamplerConfig("ddim", 10), AllSteps(), progress=False)
    quantized = diffquant.quantize(trained_unet, "tfmq", calibration, progress=False, wbits=4, abits=8, **FAST)
    details = quantized.quantization["details"]
    assert "time_embedding.linear_1" in details["temporal_layers"]
    layers = dict(quant_layers(quantized.denoiser))
    assert "conv_in" not in layers or layers["conv_in"].weight_quantizer is None  # edges keep float weights
    bank = layers["down_blocks.1.resnets.0.conv1"].input_quantizer
    assert bank.spec.per_step and bank.scale.shape[0] == 10
    diffquant.save(quantized, tmp_path / "tfmq")
    reloaded = diffquant.load(tmp_path / "tfmq")
    reloaded_bank = dict(quant_layers(reloaded.denoiser))["down_blocks.1.resnets.0.conv1"].input_quantizer
    assert torch.equal(reloaded_bank.scale, bank.scale) and torch.equal(
        reloaded_bank.bank_timesteps, bank.bank_timesteps
    )
    x, t = calibration.sample[:4], calibration.timestep[:4]
    for index in (0, 9):
        timestep = float(bank.bank_timesteps[index])
        with torch.no_grad(), step_context(index, timestep, 10):
            assert torch.equal(quantized.denoiser(x, t).sample, reloaded.denoiser(x, t).sample)


@pytest.mark.parametrize("method", ["qdiffusion", "edadm"])
def test_reconstruction_beats_naive_at_w4a8(trained_unet, calibration, held_out, method):
    naive = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4, abits=8)
    better = diffquant.quantize(
        trained_unet,
        method,
        calibration,
        progress=False,
        wbits=4,
        abits=8,
        reconstruction={"weight_iters": 150, "act_iters": 40},
    )
    assert relative_error(trained_unet, better, held_out) < relative_error(trained_unet, naive, held_out)


def test_block_pattern_that_matches_nothing_is_an_error(trained_unet, calibration):
    with pytest.raises(ConfigError, match="Block pattern 'down_blocks.*.resnet' matches no reconstruction block"):
        diffquant.quantize(trained_unet, "qdiffusion", calibration, progress=False, blocks=("down_blocks.*.resnet",))


def test_unknown_preset_and_nested_option_are_errors():
    with pytest.raises(ConfigError, match="no preset 'slow'"):
        make_config("qdiffusion", preset="slow")
    with pytest.raises(ConfigError, match="reconstruction has no option"):
        make_config("qdiffusion", reconstruction={"iterations": 5})


def test_presets_carry_the_paper_defaults():
    paper = make_config("qdiffusion", preset="paper")
    assert (paper.reconstruction.weight_iters, paper.reconstruction.act_iters) == (20000, 5000)
    assert (paper.calibration.trajectories, paper.calibration.uniform_steps) == (256, 20)
    edadm = make_config("edadm", preset="paper")
    assert edadm.reconstruction.joint and edadm.reconstruction.layer_loss_weight == 0.8
    assert edadm.calibration.policy == "tdac" and edadm.calibration.trajectories == 1024
    assert make_config("tfmq").preset == "fast" and make_config("tfmq").activation_per_step


def test_tdac_allocation():
    steps, probes, dim = 6, 4, 10
    features = torch.zeros(steps, probes, dim)
    features[:3] = 1.0  # three identical steps: dense
    features[3:] = torch.randn(3, probes, dim, generator=torch.Generator().manual_seed(0)) * 5
    counts = tdac_counts(features, total=60, lam=0.0)
    assert sum(counts) == 60 and min(counts[:3]) > max(counts[3:])
    assert sum(tdac_counts(features, total=61, lam=1.2)) == 61


def test_edadm_records_tdac_calibration(trained_unet):
    config = make_config("edadm", calibration={"trajectories": 40, "steps": 10}, reconstruction={"weight_iters": 5})
    calibration = diffquant.record_calibration(trained_unet, config, progress=False, use_cache=False)
    assert isinstance(calibration, CalibrationSet) and len(calibration) == 40
    assert calibration.meta["policy"] == "allocated(40 samples)"


def test_killed_svdquant_reconstruction_resumes_to_the_same_model(trained_unet, calibration, tmp_path, monkeypatch):
    options = {"preset": "reconstructed", "rank": 4, "calibration_samples": 32, "search_samples": 8}
    options["reconstruction"] = {"weight_iters": 6, "batch_size": 8, "float_lr": 1e-3}
    straight = diffquant.quantize(
        trained_unet, "svdquant", calibration, progress=False, checkpoint_dir=str(tmp_path / "a"), **options
    )
    quantize_killed(trained_unet, "svdquant", calibration, tmp_path / "b", 3, monkeypatch, **options)
    resumed = diffquant.quantize(
        trained_unet, "svdquant", calibration, progress=False, checkpoint_dir=str(tmp_path / "b"), **options
    )
    assert resumed.quantization["details"]["resumed_units"] >= 3
    # trained branches and learned rounding of the finished units come back from the checkpoint exactly
    for (name, a), (_, b) in zip(
        straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
