"""diffusers-native export: a quanto-int8 directory that diffusers' from_pretrained loads by itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel

from diffquant.engines import prepare_model
from diffquant.methods import make_config
from diffquant.modules.surgery import quant_layers
from diffquant.runtime.diffusers_format import export_diffusers

pytest.importorskip("optimum.quanto")


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
    ).eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
        "pooled_projections": torch.randn(2, 32, generator=generator),
        "timestep": torch.tensor([10.0, 500.0]),
    }


def _weight_only(denoiser, **options):
    prepare_model(denoiser, make_config("naive", abits=None, **options).layer_policy())
    for _, layer in quant_layers(denoiser):
        layer.freeze()
    return denoiser


def test_int8_weights_load_in_diffusers_exactly(tmp_path):
    quantized = _weight_only(_tiny_sd3(), wbits=8, keep_fp=("proj_out",))
    report = export_diffusers(quantized, tmp_path / "q")
    assert report["exact_linears"] > 20 and not report["rounded_linears"]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "quanto"
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert type(loaded.proj_out).__name__ == "Linear"  # kept in float by name
    for name, layer in quant_layers(quantized):
        if layer.kind == "linear":
            assert torch.equal(loaded.get_submodule(name).weight.dequantize(), layer.dequantized_weight()), name
    with torch.no_grad():
        ours, theirs = quantized(**_inputs()).sample, loaded(**_inputs()).sample
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_four_bit_codes_survive_in_int8_and_activations_are_reported_dropped(tmp_path):
    denoiser = _tiny_sd3()
    prepare_model(denoiser, make_config("naive", wbits=4, abits=8).layer_policy())
    for _, layer in quant_layers(denoiser):
        layer.freeze()
    report = export_diffusers(denoiser, tmp_path / "q")
    assert report["exact_linears"] > 20 and report["activation_quantizers_dropped"] > 20
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    layer = denoiser.transformer_blocks[1].ff.net[2]
    weight = loaded.transformer_blocks[1].ff.net[2].weight
    assert torch.equal(weight.dequantize(), layer.dequantized_weight())
    assert weight._data.abs().max() <= 8  # int4 codes held in int8


def test_directory_loads_without_diffquant(tmp_path):
    export_diffusers(_weight_only(_tiny_sd3(), wbits=8), tmp_path / "q")
    script = (
        "import sys; sys.modules['diffquant'] = None\n"
        "from diffusers import SD3Transformer2DModel\n"
        f"m = SD3Transformer2DModel.from_pretrained({str(tmp_path / 'q')!r})\n"
        "print(type(m.transformer_blocks[0].attn.to_q).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("QLinear")
