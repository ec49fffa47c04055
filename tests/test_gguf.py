"""GGUF: block encodings against the gguf package, our codes in the file, and diffusers' own loader."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from diffquant.engines import prepare_model
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import make_config
from diffquant.modules.surgery import quant_layers
from diffquant.quant import gguf_blocks
from diffquant.runtime.gguf import (
    diffusers_tensors,
    export_gguf,
    load_gguf_denoiser,
    read_gguf,
    to_original_layout,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402


def _tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()


def _tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _on_grid(denoiser, grid: str = "q4_0"):
    """Weight-only naive RTN on a GGUF grid, frozen (no calibration data needed)."""
    config = make_config("naive", wbits=gguf_blocks.block_type(grid).bits, abits=None, weight_grid=grid)
    prepare_model(denoiser, config.layer_policy())
    for _, layer in quant_layers(denoiser):
        layer.freeze()
    return denoiser


def _sd3_inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
        "pooled_projections": torch.randn(2, 32, generator=generator),
        "timestep": torch.tensor([10.0, 500.0]),
    }


def _flux_inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
    }


@pytest.mark.parametrize("name", list(gguf_blocks.BLOCK_TYPES))
def test_block_encoding_is_bit_exact_against_the_gguf_package(name):
    torch.manual_seed(0)
    x = torch.randn(48, 128) * 0.05
    x[3, :32] = 0  # an all-zero block
    x[5, :32] = torch.tensor([1.0, -1.0] * 16)  # ties between +max and -max
    x[7, :32] = torch.linspace(-1, 1, 32)
    kind = gguf_blocks.block_type(name)
    reference = quants.quantize(x.numpy(), GGMLQuantizationType(kind.ggml_type))
    ours = gguf_blocks.quantize_rows(x, kind).numpy()
    assert ours.shape == reference.shape and np.array_equal(ours, reference)
    decoded = gguf_blocks.dequantize_rows(torch.from_numpy(reference), kind).numpy()
    assert np.array_equal(decoded, quants.dequantize(reference, GGMLQuantizationType(kind.ggml_type)))


def test_rtn_on_the_grid_writes_the_gguf_packages_own_bytes(tmp_path):
    float_model = _tiny_sd3()
    weight = float_model.transformer_blocks[0].ff.net[2].weight.detach().clone()
    quantized = _on_grid(_tiny_sd3(), "q4_0")
    report = export_gguf(quantized, tmp_path / "m.gguf", layout="diffusers")
    assert "transformer_blocks.0.ff.net.2.weight" in report.ours and not report.rounded
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "transformer_blocks.0.ff.net.2.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_0
    assert np.array_equal(np.array(tensor.data), quants.quantize(weight.numpy(), GGMLQuantizationType.Q4_0))


def test_learned_rounding_codes_are_written_unchanged(tmp_path):
    denoiser = _tiny_sd3()
    config = make_config("naive", wbits=4, abits=None, weight_grid="q4_0")
    prepare_model(denoiser, config.layer_policy())
    layer = denoiser.transformer_blocks[1].ff.net[0].proj
    state = layer.start_adaround()
    with torch.no_grad():
        state.alpha.copy_(torch.randn_like(state.alpha) * 3)  # rounding decisions unlike RTN
    for _, quant_layer in quant_layers(denoiser):
        quant_layer.freeze()
    rtn = gguf_blocks.gguf_rtn_codes(
        _tiny_sd3().transformer_blocks[1].ff.net[0].proj.weight.detach().reshape(-1, 32), "q4_0"
    )
    assert not torch.equal(layer.weight_codes.to(torch.int64), rtn)
    export_gguf(denoiser, tmp_path / "m.gguf", layout="diffusers")
    tensors, _ = read_gguf(tmp_path / "m.gguf")
    assert torch.equal(tensors["transformer_blocks.1.ff.net.0.proj.weight"], layer.dequantized_weight())


def test_sd3_original_layout_is_the_inverse_of_diffusers_converter():
    model = _tiny_sd3()
    original, _ = to_original_layout("SD3Transformer2DModel", diffusers_tensors(model))
    assert "joint_blocks.0.x_block.attn.qkv.weight" in original and "final_layer.linear.weight" in original
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    state = model.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def _assert_same_weights(ours, loaded) -> None:
    """diffusers dequantizes blocks in fp16 (d * q rounded to fp16): its weights are ours rounded to fp16."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    quantized = 0
    for name, layer in quant_layers(ours):
        theirs = loaded.get_submodule(name).weight
        if hasattr(theirs, "quant_type"):
            quantized += 1
            theirs = dequantize_gguf_tensor(theirs)
        assert torch.equal(theirs.float(), layer.dequantized_weight().half().float()), name
    assert quantized > 5


def _diffusers_load(cls, path, config_dir):
    return cls.from_single_file(
        str(path),
        config=str(config_dir),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )


def test_sd3_gguf_loads_through_diffusers_and_matches_our_model(tmp_path):
    quantized = _on_grid(_tiny_sd3(), "q4_0")
    quantized.save_config(tmp_path / "config")
    report = export_gguf(quantized, tmp_path / "sd3.gguf")
    assert report.layout == "original" and report.architecture == "sd3"
    assert report.to_json()["types"]["q4_0"] > 10
    loaded = _diffusers_load(SD3Transformer2DModel, tmp_path / "sd3.gguf", tmp_path / "config")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    _assert_same_weights(quantized, loaded)
    with torch.no_grad():
        ours = quantized(**_sd3_inputs()).sample
        theirs = loaded(**_sd3_inputs()).sample
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0)  # fp16 weight rounding only
    with torch.no_grad():
        float_out = _tiny_sd3()(**_sd3_inputs()).sample
    assert (ours - float_out).abs().max() > 1e-4  # the comparison is not trivially float vs float


def test_flux_gguf_loads_through_diffusers_and_matches_our_model(tmp_path):
    quantized = _on_grid(_tiny_flux(), "q8_0")
    quantized.save_config(tmp_path / "config")
    report = export_gguf(quantized, tmp_path / "flux.gguf", layout="diffusers")
    assert report.to_json()["types"]["q8_0"] > 5
    loaded = _diffusers_load(FluxTransformer2DModel, tmp_path / "flux.gguf", tmp_path / "config")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    _assert_same_weights(quantized, loaded)
    with torch.no_grad():
        ours = quantized(**_flux_inputs()).sample
        theirs = loaded(**_flux_inputs()).sample
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0)  # fp16 weight rounding only


def test_flux_original_layout_names_and_fusions():
    original, _ = to_original_layout("FluxTransformer2DModel", diffusers_tensors(_tiny_flux()))
    state = _tiny_flux().state_dict()
    assert torch.equal(
        original["single_blocks.0.linear1.weight"],
        torch.cat(
            [
                state[f"single_transformer_blocks.0.{p}.weight"]
                for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            ]
        ),
    )
    assert torch.equal(
        original["double_blocks.0.img_attn.norm.query_norm.scale"], state["transformer_blocks.0.attn.norm_q.weight"]
    )
    shift, scale = original["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), state["norm_out.linear.weight"])
    assert sum(v.numel() for v in original.values()) == sum(v.numel() for v in state.values())


def test_float_model_is_rounded_to_the_requested_type_and_read_back(tmp_path):
    model = _tiny_sd3()
    report = export_gguf(model, tmp_path / "f.gguf", float_type="q5_1", layout="diffusers")
    assert report.rounded and not report.ours
    loaded = load_gguf_denoiser(tmp_path / "f.gguf")
    weight = model.transformer_blocks[0].attn.to_k.weight.detach()
    expected = gguf_blocks.dequantize_rows(
        gguf_blocks.quantize_rows(weight, gguf_blocks.block_type("q5_1")), gguf_blocks.block_type("q5_1")
    )
    assert torch.equal(loaded.transformer_blocks[0].attn.to_k.weight, expected)


def test_grid_options_fail_clearly():
    with pytest.raises(ConfigError, match="wbits=4"):
        make_config("naive", wbits=8, abits=None, weight_grid="q4_0").validate()
    with pytest.raises(ConfigError, match="symmetric GGUF grids"):
        make_config("naive", wbits=4, abits=None, weight_grid="q4_1").layer_policy()
    denoiser = _tiny_sd3()
    prepare_model(denoiser, make_config("naive", wbits=8, abits=None).layer_policy())
    for _, layer in quant_layers(denoiser):
        layer.freeze()
    with pytest.raises(DiffquantError, match="weight_grid"):
        export_gguf(denoiser, "/nonexistent/x.gguf")


logging.getLogger("diffusers").setLevel(logging.ERROR)


def test_cli_exports_gguf_and_diffusers_formats(tmp_path):
    import json

    from typer.testing import CliRunner

    import diffquant
    from diffquant.cli import app

    model = diffquant.load("fmnist-dit")
    prepare_model(model.denoiser, make_config("naive", wbits=4, abits=None, weight_grid="q4_0").layer_policy())
    for _, layer in quant_layers(model.denoiser):
        layer.freeze()
    model.quantization = {"method": "naive", "setting": "W4A16"}
    diffquant.save(model, tmp_path / "q4")
    runner = CliRunner()
    done = runner.invoke(
        app, ["export", "--model", str(tmp_path / "q4"), "--format", "gguf", "--out", str(tmp_path / "m")]
    )
    assert done.exit_code == 0, done.output
    assert "74 weights from the method's own codes" in done.output and (tmp_path / "m.gguf").is_file()
    loaded = load_gguf_denoiser(tmp_path / "m.gguf")
    layer = model.denoiser.transformer_blocks[0].ff.net[2]
    assert torch.equal(loaded.transformer_blocks[0].ff.net[2].weight, layer.dequantized_weight())
    done = runner.invoke(
        app, ["export", "--model", str(tmp_path / "q4"), "--format", "diffusers", "--out", str(tmp_path / "d")]
    )
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quanto"


def test_flux_original_layout_fits_diffusers_converter_at_flux_width():
    """diffusers' Flux converter hard-codes width 3072: check names and shapes on the meta device."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    original, _ = to_original_layout("FluxTransformer2DModel", diffusers_tensors(model))
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    state = model.state_dict()
    assert set(back) == set(state)
    assert all(back[key].shape == state[key].shape for key in state)


def _tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def test_sd_unet_original_layout_is_the_inverse_of_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = _tiny_sd_unet()
    original, _ = to_original_layout("UNet2DConditionModel", diffusers_tensors(model), dict(model.config))
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in original
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original  # up block 0 has no attention
    back = convert_ldm_unet_checkpoint(dict(original), dict(model.config))
    state = model.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_sd_unet_gguf_loads_through_diffusers_and_matches_our_model(tmp_path):
    from diffusers import UNet2DConditionModel

    quantized = _on_grid(_tiny_sd_unet(), "q8_0")
    quantized.save_config(tmp_path / "config")
    report = export_gguf(quantized, tmp_path / "unet.gguf")
    assert report.layout == "original" and report.architecture == "sd1"
    loaded = _diffusers_load(UNet2DConditionModel, tmp_path / "unet.gguf", tmp_path / "config")
    _assert_same_weights_of_linears(quantized, loaded)
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 600]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
    }
    with torch.no_grad():
        ours, theirs = quantized(**inputs).sample, loaded(**inputs).sample
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0)


def _assert_same_weights_of_linears(ours, loaded) -> None:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    converted = 0
    for name, layer in quant_layers(ours):
        theirs = loaded.get_submodule(name).weight
        expected = layer.dequantized_weight()
        if hasattr(theirs, "quant_type"):  # a GGUF linear: dequantized in fp16 by diffusers
            converted += 1
            theirs, expected = dequantize_gguf_tensor(theirs), expected.half()
        assert torch.equal(theirs.float(), expected.float()), name
    assert converted > 5


def test_split_shortcut_halves_on_one_grid_are_joined_block_by_block(tmp_path):
    import diffquant
    from diffquant.modules.layers import SplitQuantConv2d

    model = diffquant.load("fmnist-unet")
    config = make_config("naive", wbits=4, abits=None, weight_grid="q4_0")
    prepare_model(model.denoiser, config.layer_policy(), {"up_blocks.2.resnets.0.conv1": 64})
    for _, layer in quant_layers(model.denoiser):
        layer.freeze()
    split = model.denoiser.up_blocks[2].resnets[0].conv1
    assert isinstance(split, SplitQuantConv2d)
    report = export_gguf(model, tmp_path / "unet.gguf")
    assert report.tensors["up_blocks.2.resnets.0.conv1.weight"] == "q4_0"
    joined = torch.cat([split.low.dequantized_weight(), split.high.dequantized_weight()], 1)
    assert torch.equal(load_gguf_denoiser(tmp_path / "unet.gguf").up_blocks[2].resnets[0].conv1.weight, joined)
