"""A user's LoRA (diffusers / peft files) on a quantized model: a 16-bit branch beside the quantized layers."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from typer.testing import CliRunner

import diffquant
from diffquant.cli import app
from diffquant.errors import ConfigError, DiffquantError
from diffquant.modules.lora import LoRAHost
from diffquant.runtime.export import export_model
from tests.conftest import needs_fmnist
from tests.family_models import family_inputs, family_model, outputs, relative_mse

TARGETS = {
    "dit": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.0.proj", "ff.net.2"],
    "sd-unet": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"],
}
PREFIX = {"dit": "transformer", "sd3": "transformer", "sd-unet": "unet"}
GAIN = {"dit": 0.5, "sd3": 1.0, "sd-unet": 0.5}  # a LoRA that moves each tiny model well beyond W8A8's error
ATTENTION_ONLY = ["to_q", "to_k", "to_v", "to_out.0"]  # layers no backend fuses with a neighbour


def lora_state(denoiser, targets, rank=4, alpha=8.0, seed=0, gain=0.5) -> dict[str, torch.Tensor]:
    """A random LoRA on `denoiser` as peft writes it (`<module>.lora_A.weight` / `.lora_B.weight`)."""
    torch.manual_seed(seed)
    carrier = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        copy.deepcopy(denoiser),
    )
    return {key: value * gain for key, value in get_peft_model_state_dict(carrier).items()}


def write_diffusers_lora(path, state, prefix, rank=4, alpha=8.0):
    """The file a pipeline's `save_lora_weights` writes: component prefix on keys and on the LoraConfig fields
    in the header."""
    config = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file({f"{prefix}.{key}": value.contiguous() for key, value in state.items()}, str(path), metadata=metadata)
    return path


def float_with_lora(model, state, targets, rank=4, alpha=8.0):
    """The float reference: peft's own LoRA layers injected into a copy (what diffusers' loader builds)."""
    reference = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), reference.denoiser)
    assert not set_peft_model_state_dict(reference.denoiser, state).unexpected_keys
    return reference


@pytest.fixture(scope="module")
def dit_setup(tmp_path_factory):
    model = family_model("dit")
    quantized = diffquant.quantize(model, "naive", family_inputs(model), progress=False, wbits=8, abits=8)
    directory = tmp_path_factory.mktemp("lora")
    state = lora_state(model.denoiser, TARGETS["dit"])
    path = write_diffusers_lora(directory / "style.safetensors", state, "transformer")
    other_state = lora_state(model.denoiser, ATTENTION_ONLY, seed=1)
    other = write_diffusers_lora(directory / "other.safetensors", other_state, "transformer")
    return model, quantized, state, path, other, family_inputs(model, per_step=4, seed=99)


@pytest.mark.parametrize("family", ["dit", "sd3", "sd-unet"])
def test_quantized_plus_lora_is_closer_to_float_plus_lora_than_quantized_alone(family, tmp_path):
    model = family_model(family)
    quantized = diffquant.quantize(model, "naive", family_inputs(model), progress=False, wbits=8, abits=8)
    state = lora_state(model.denoiser, TARGETS[family], gain=GAIN[family])
    path = write_diffusers_lora(tmp_path / "lora.safetensors", state, PREFIX[family])
    fresh = family_inputs(model, per_step=4, seed=99)
    reference = outputs(float_with_lora(model, state, TARGETS[family]), fresh)
    lora_effect = relative_mse(reference, outputs(model, fresh))
    alone = relative_mse(reference, outputs(quantized, fresh))
    quantization_error = relative_mse(outputs(model, fresh), outputs(quantized, fresh))
    diffquant.load_lora(quantized, path)
    with_lora = relative_mse(reference, outputs(quantized, fresh))
    print(f"{family}: LoRA effect {lora_effect:.2e}, W8A8 error {quantization_error:.2e}; vs float+LoRA: "
          f"quantized alone {alone:.2e}, quantized+LoRA {with_lora:.2e}")
    # the LoRA moves the float model far more than W8A8 does; with the branch the quantized model follows it
    assert lora_effect > 10 * quantization_error
    assert with_lora < 0.1 * alone
    assert with_lora < 3 * quantization_error


def test_a_file_reads_as_diffusers_own_loader_reads_it(tmp_path):
    # diffusers' `load_lora_adapter` on the float SD3 transformer, against our branch on the float model
    model = family_model("sd3")
    state = lora_state(model.denoiser, TARGETS["sd3"])
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"transformer.{key}": value.contiguous() for key, value in state.items()}, str(path))
    fresh = family_inputs(model, per_step=4, seed=99)
    reference = copy.deepcopy(model)
    reference.denoiser.load_lora_adapter(str(path), prefix="transformer", adapter_name="reference")
    ours = copy.deepcopy(model)
    assert diffquant.load_lora(ours, tmp_path, name="style") == "style"
    expected = outputs(reference, fresh)
    assert relative_mse(expected, outputs(model, fresh)) > 1e-4
    assert relative_mse(expected, outputs(ours, fresh)) < 1e-12


def test_unload_restores_the_original_outputs_exactly(dit_setup):
    _, quantized, _, path, other, fresh = dit_setup
    before = outputs(quantized, fresh)
    layers = dict(quantized.denoiser.named_modules())
    diffquant.load_lora(quantized, path, name="style")
    diffquant.load_lora(quantized, other, name="other", scale=0.7)
    assert diffquant.loaded_adapters(quantized) == ["style", "other"]
    assert any(isinstance(m, LoRAHost) for m in quantized.denoiser.modules())
    diffquant.unload_lora(quantized, "other")
    only_style = outputs(quantized, fresh)
    diffquant.unload_lora(quantized)
    after = outputs(quantized, fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert dict(quantized.denoiser.named_modules()).keys() == layers.keys()  # the very same layers, no host left
    assert all(layers[name] is module for name, module in quantized.denoiser.named_modules())
    diffquant.load_lora(quantized, path, name="style")  # unloading one adapter leaves exactly the other
    assert all(torch.equal(a, b) for a, b in zip(only_style, outputs(quantized, fresh), strict=True))
    diffquant.unload_lora(quantized)


def test_scale_zero_is_no_lora_and_scales_switch_at_run_time(dit_setup, tmp_path):
    _, quantized, _, path, other, fresh = dit_setup
    plain = outputs(quantized, fresh)
    diffquant.load_lora(quantized, path, name="style", scale=0.5)
    half = outputs(quantized, fresh)
    diffquant.set_lora_scale(quantized, 0.0, name="style")
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(quantized, fresh), strict=True))
    diffquant.set_lora_scale(quantized, {"style": 0.5})
    assert all(torch.equal(a, b) for a, b in zip(half, outputs(quantized, fresh), strict=True))
    diffquant.load_lora(quantized, other, name="other")
    diffquant.set_adapters(quantized, ["style"], [0.5])  # diffusers' set_adapters: only these run
    assert all(torch.equal(a, b) for a, b in zip(half, outputs(quantized, fresh), strict=True))
    diffquant.set_adapters(quantized, ["style", "other"], [0.5, 1.0])
    both = outputs(quantized, fresh)
    assert relative_mse(half, both) > 1e-4
    with pytest.raises(ConfigError, match="No adapter named 'missing'"):
        diffquant.set_adapters(quantized, ["missing"])
    with pytest.raises(DiffquantError, match="unload_lora"):
        diffquant.save(quantized, tmp_path / "saved")
    diffquant.unload_lora(quantized)
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(quantized, fresh), strict=True))


def test_lora_runs_beside_the_onednn_int8_kernels(dit_setup):
    _, quantized, _, path, other, fresh = dit_setup
    diffquant.load_lora(quantized, path, name="style")
    simulated = outputs(quantized, fresh)
    deployed = export_model(quantized, "onednn")  # loaded before export: the int8 layers sit inside the hosts
    diffquant.unload_lora(quantized)
    kernels = deployed.quantization["kernels"]
    assert kernels.get("linear: onednn::qlinear_pointwise", 0) >= 12, kernels
    real = outputs(deployed, fresh)
    for a, b in zip(simulated, real, strict=True):  # tests/test_runtime.py's whole-model tolerance
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.02
    print(f"onednn vs simulation, LoRA loaded before export: relative MSE {relative_mse(simulated, real):.2e}")
    assert relative_mse(simulated, real) < 1e-4
    # loaded after export: unfused layers take it, exactly as before export; fused ones say to load first
    plain = export_model(quantized, "onednn")
    before = outputs(plain, fresh)
    diffquant.load_lora(quantized, other, name="other")
    simulated_other = outputs(quantized, fresh)
    diffquant.unload_lora(quantized)
    diffquant.load_lora(plain, other, name="other")
    for a, b in zip(simulated_other, outputs(plain, fresh), strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.02
    with pytest.raises(DiffquantError, match="fused with their neighbours.*before export_model"):
        diffquant.load_lora(plain, path, name="style")
    diffquant.unload_lora(plain)
    assert all(torch.equal(a, b) for a, b in zip(before, outputs(plain, fresh), strict=True))


def test_lora_runs_beside_the_inductor_lowered_kernels_compiled(dit_setup):
    # the inductor backend: the LoRA branch sits beside each int8 layer in the frozen, compiled graph
    _, quantized, _, path, _, fresh = dit_setup
    diffquant.load_lora(quantized, path, name="style")
    simulated = outputs(quantized, fresh)
    deployed = export_model(quantized, "inductor", compile=True)
    diffquant.unload_lora(quantized)
    assert deployed.quantization["kernels"].get("linear: onednn::qlinear_pointwise (inductor-lowered)", 0) >= 12
    real = outputs(deployed, fresh)
    for a, b in zip(simulated, real, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.02
    assert relative_mse(simulated, real) < 1e-4


def test_lora_runs_inside_the_openvino_graph_loaded_before_or_after_export(dit_setup):
    pytest.importorskip("openvino")
    _, quantized, _, path, other, fresh = dit_setup
    diffquant.load_lora(quantized, path, name="style")
    simulated = outputs(quantized, fresh)
    deployed = export_model(quantized, "openvino")  # the branch is converted with the int8 layers it sits beside
    diffquant.unload_lora(quantized)
    assert deployed.quantization["kernels"].get("linear: openvino int8 FullyConnected", 0) >= 12
    for a, b in zip(simulated, outputs(deployed, fresh), strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.02
    # loaded after the graph was compiled: the next call compiles it again with the adapter, and unloading
    # gives the plain model's graph back
    plain = export_model(quantized, "openvino")
    before = outputs(plain, fresh)
    diffquant.load_lora(quantized, other, name="other")
    simulated_other = outputs(quantized, fresh)
    diffquant.unload_lora(quantized)
    diffquant.load_lora(plain, other, name="other")
    with_other = outputs(plain, fresh)
    for a, b, c in zip(simulated_other, with_other, before, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.02 and not torch.allclose(b, c)
    diffquant.unload_lora(plain)
    for a, b in zip(before, outputs(plain, fresh), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_peft_directory_layout_reads_like_the_diffusers_file(dit_setup, tmp_path):
    _, quantized, state, path, _, fresh = dit_setup
    diffquant.load_lora(quantized, path, name="diffusers")
    expected = outputs(quantized, fresh)
    diffquant.unload_lora(quantized)
    peft_state = {f"base_model.model.{key}": value.contiguous() for key, value in state.items()}
    save_file(peft_state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    assert diffquant.load_lora(quantized, tmp_path) == tmp_path.name
    assert all(torch.equal(a, b) for a, b in zip(expected, outputs(quantized, fresh), strict=True))
    diffquant.unload_lora(quantized)


def test_keys_that_match_nothing_and_shape_mismatches_are_one_clear_error(dit_setup, tmp_path):
    _, quantized, state, _, _, fresh = dit_setup
    before = outputs(quantized, fresh)
    key = "transformer_blocks.0.attn1.to_q"
    renamed = {k.replace("attn1.to_q", "attn9.to_q"): v for k, v in state.items()}
    with pytest.raises(ConfigError, match=r"'transformer_blocks.0.attn9.to_q' matches no module"):
        diffquant.load_lora(quantized, write_diffusers_lora(tmp_path / "renamed.safetensors", renamed, "transformer"))
    rank = dict(state, **{f"{key}.lora_B.weight": state[f"{key}.lora_B.weight"][:, :3]})
    with pytest.raises(ConfigError, match=r"to_q': lora_B has rank 3, lora_A has rank 4"):
        diffquant.load_lora(quantized, write_diffusers_lora(tmp_path / "rank.safetensors", rank, "transformer"))
    wide = dict(state, **{f"{key}.lora_A.weight": torch.randn(4, 40)})
    with pytest.raises(ConfigError, match=r"do not fit the layer's weight \(16, 16\)"):
        diffquant.load_lora(quantized, write_diffusers_lora(tmp_path / "wide.safetensors", wide, "transformer"))
    text = {f"text_encoder.{key}": value.clone() for key, value in state.items()}
    save_file({**text, **{f"transformer.{k}": v for k, v in state.items()}}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ConfigError, match="text_encoder; diffquant loads LoRAs onto the denoiser only"):
        diffquant.load_lora(quantized, tmp_path / "te.safetensors")
    assert diffquant.loaded_adapters(quantized) == []  # nothing half-attached
    assert all(torch.equal(a, b) for a, b in zip(before, outputs(quantized, fresh), strict=True))


def test_fine_tuned_checkpoint_quantizes_and_samples_with_lora_in_one_command_each(tmp_path):
    # a user's fine-tune is a plain diffusers directory (save_pretrained + scheduler config)
    model = family_model("dit")
    model.denoiser.save_pretrained(tmp_path / "my-finetune")
    (tmp_path / "my-finetune" / "scheduler").mkdir()
    (tmp_path / "my-finetune" / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    state = lora_state(model.denoiser, TARGETS["dit"])
    path = write_diffusers_lora(tmp_path / "style.safetensors", state, "transformer")
    runner = CliRunner()
    quantize = [
        "quantize", "--model", str(tmp_path / "my-finetune"), "--method", "naive", "--wbits", "8", "--abits", "8",
        "--out", str(tmp_path / "q"), "--trajectories", "4",
    ]
    result = runner.invoke(app, quantize)
    assert result.exit_code == 0, result.output
    sample = [
        "sample", "--model", str(tmp_path / "q"), "--backend", "onednn", "--lora", f"{path}:0.8",
        "--num-samples", "2", "--steps", "3", "--label", "1", "--out", str(tmp_path / "samples"),
    ]
    result = runner.invoke(app, sample)
    assert result.exit_code == 0, result.output
    assert "LoRA 'style'" in result.output and "at scale 0.8" in result.output
    assert (tmp_path / "samples" / "samples.png").is_file()
    missing = [*sample[:6], str(tmp_path / "nothing.safetensors"), *sample[7:]]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "nothing.safetensors does not exist" in result.output


@needs_fmnist
def test_eval_scores_with_a_lora_against_the_float_model_with_the_same_lora(tmp_path, monkeypatch):
    from diffquant.calibration import UniformSteps, record_trajectories
    from diffquant.evaluation import Scorer, get_protocol
    from diffquant.evaluation.protocol import agreement, protocol_samples
    from diffquant.sampling import SamplerConfig

    scorer = Scorer.load()  # the reference statistics once, not once per command
    monkeypatch.setattr(Scorer, "load", classmethod(lambda cls, reference="fashion-mnist-test": scorer))

    float_model = diffquant.load("fmnist-dit")
    calibration = record_trajectories(float_model, 4, SamplerConfig("ddim", 4), UniformSteps(2), progress=False)
    quantized = diffquant.quantize(float_model, "naive", calibration, progress=False, wbits=8, abits=8)
    diffquant.save(quantized, tmp_path / "q")
    state = lora_state(float_model.denoiser, ATTENTION_ONLY, gain=0.3)
    path = write_diffusers_lora(tmp_path / "style.safetensors", state, "transformer")
    command = ["eval", "--model", str(tmp_path / "q"), "--protocol", "smoke", "-n", "10", "--steps", "3"]
    results = {}
    for name, extra in (("none", []), ("off", ["--lora", f"{path}:0"]), ("on", ["--lora", f"{path}:1.5"])):
        result = CliRunner().invoke(app, [*command, *extra, "--out", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["rows"][0]["metrics"]
    assert "LoRA 'style'" in result.output and "at scale 1.5" in result.output
    assert results["off"]["fid"] == results["none"]["fid"]  # scale 0 is no LoRA
    assert results["on"]["fid"] != results["none"]["fid"]
    # PSNR/SSIM compare with the float model carrying the same LoRA at the same scale, not the bare float model
    protocol = get_protocol("smoke", num_samples=10, sampler=SamplerConfig("ddim", 3))
    diffquant.load_lora(quantized, path, scale=1.5)
    images = protocol_samples(quantized, protocol, progress=False).images
    bare = agreement(images, protocol_samples(float_model, protocol, progress=False).images)["psnr_vs_ref"]
    diffquant.load_lora(float_model, path, scale=1.5)
    same = agreement(images, protocol_samples(float_model, protocol, progress=False).images)["psnr_vs_ref"]
    assert results["on"]["psnr_vs_ref"] == pytest.approx(same, rel=1e-5) and same > bare + 3.0, (same, bare)
    missing = CliRunner().invoke(app, [*command, "--lora", str(tmp_path / "nothing.safetensors")])
    assert missing.exit_code == 2 and "nothing.safetensors does not exist" in missing.output
