"""Token generators in the main surfaces: `diffquant bench`, `sample` and `eval` on a tiny seeded generator."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffquant.bench import BENCH_PRESETS, RowSpec, run_bench
from diffquant.bench.report import write_report
from diffquant.errors import DiffquantError
from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
from diffquant.tokens.generator import TokenGenerator
from diffquant.tokens.samplers import TokenSamplerConfig
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder
from tests.conftest import needs_fmnist

TINY_SAMPLER = TokenSamplerConfig("maskgit", 3, guidance_scale=2.0)


def _tiny_denoiser() -> TokenDenoiser:
    torch.manual_seed(0)
    return TokenDenoiser(DenoiserConfig(codebook_size=16, num_tokens=49, width=32, depth=1, heads=2)).eval()


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """A train-free generator: seeded random tokenizer (codes spread apart, so tokens show) and denoiser."""
    torch.manual_seed(0)
    tokenizer = VQAutoencoder(TokenizerConfig(quantizer="vq", codebook_size=16, latent_dim=8, width=4))
    tokenizer.quantizer.set_codebook(torch.randn(16, 8) * 5)
    path = tmp_path_factory.mktemp("tokens") / "gen"
    TokenGenerator(tokenizer.eval(), _tiny_denoiser(), "tiny-vq", TINY_SAMPLER).save(path)
    return path


def test_codebook_rows_run_once_per_model_at_their_own_setting():
    preset = replace(BENCH_PRESETS["smoke"], methods=("naive", "weight-vq"), settings=("W8A8", "W4A8"), peers=())
    rows = preset.rows()
    assert [(r.method, r.setting) for r in rows] == [("naive", "W8A8"), ("naive", "W4A8"), ("weight-vq", "W2A16")]


@needs_fmnist
def test_bench_rows_for_a_token_generator(generator_dir, tmp_path):
    preset = replace(
        BENCH_PRESETS["smoke"],
        models=(str(generator_dir),),
        methods=("naive", "ptq4dm", "mixdq", "weight-vq"),
        settings=("W8A8", "W4A8"),
        peers=("quanto",),
        method_options={name: {"calibration": {"trajectories": 8}} for name in ("naive", "ptq4dm")},
    )
    out = tmp_path / "bench"
    rows = run_bench(preset, out, num_samples=20, progress=False)
    by_key = {(r["method"], r["setting"]): r for r in rows}
    fp32 = by_key[("fp32", "W32A32")]
    assert fp32["family"] == "reference" and math.isfinite(fp32["metrics"]["fid"])
    assert fp32["sampler"]["sampler"] == "maskgit" and fp32["sampler"]["guidance_scale"] == 2.0
    reference_grid = np.load(out / fp32["grid"])
    quantized = [("naive", "W8A8"), ("naive", "W4A8"), ("ptq4dm", "W8A8"), ("ptq4dm", "W4A8"), ("weight-vq", "W2A16")]
    for key in quantized:
        row = by_key[key]
        assert row["status"] == "ok", row["status"]
        assert math.isfinite(row["metrics"]["fid"]) and row["num_samples"] == 20
        # a silent no-op would give the fp32 samples back: same seeds, so they must differ somewhere
        assert row["metrics"]["psnr_vs_ref"] < 99  # identical sample sets score 100 dB
        assert not np.array_equal(np.load(out / row["grid"]), reference_grid)
        assert 0 < row["disk_mb"] < fp32["disk_mb"] and row["bits_per_weight"] < 32
    assert by_key[("naive", "W4A8")]["disk_mb"] < by_key[("naive", "W8A8")]["disk_mb"]  # 4-bit codes are packed
    assert by_key[("naive", "W8A8")]["coverage"]["text"] == "0/0 conv, 5/5 linear"
    assert by_key[("mixdq", "W8A8")]["status"].startswith("skipped: mixdq quantizes a text conditioning")
    assert by_key[("quanto", "W4A8")]["status"].startswith("skipped: peers quantize diffusers denoisers")
    # the saved quantized denoiser loads back and samples exactly what the row scored
    from diffquant.tokens.storage import load_token_model

    loaded = load_token_model(out / "models" / RowSpec(str(generator_dir), "naive", "W4A8").key)
    original = TokenGenerator.load(generator_dir)
    images, _ = TokenGenerator(original.tokenizer, loaded, sampler=TINY_SAMPLER).generate(20, TINY_SAMPLER)
    row_grid = np.load(out / by_key[("naive", "W4A8")]["grid"])
    from diffquant.data import to_uint8

    assert np.array_equal(to_uint8(images[: len(row_grid)]).numpy(), row_grid)
    # the report puts the token generator in the same table format, with its sampler stated
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    write_report(rows, "smoke", protocol, out, out / "BENCHMARKS.md", "diffquant bench")
    report = (out / "BENCHMARKS.md").read_text()
    assert f"## {generator_dir}" in report and "maskgit 3 steps, CFG 2" in report
    assert "| naive | W4A8 |" in report and "| weight-vq | W2A16 |" in report
    # finished rows are kept: a second run recomputes nothing
    stamp = (out / "rows" / f"{RowSpec(str(generator_dir), 'naive', 'W8A8').key}.json").stat().st_mtime_ns
    run_bench(preset, out, num_samples=20, progress=False)
    assert (out / "rows" / f"{RowSpec(str(generator_dir), 'naive', 'W8A8').key}.json").stat().st_mtime_ns == stamp


@needs_fmnist
def test_codebook_row_is_skipped_for_a_diffusion_model(tmp_path):
    from diffquant.bench.runner import BenchRunner

    runner = BenchRunner(BENCH_PRESETS["smoke"], tmp_path, progress=False)
    row = runner.run_row(RowSpec("fmnist-unet", "weight-vq", "W2A16"))
    assert row["status"] == "skipped: weight-vq (codebook weights) runs on token generators only"


@pytest.mark.parametrize("method", ["tfmq", "viditq", "svdquant"])
def test_methods_that_probe_temporal_layers_run_on_token_grids(method):
    from diffquant.modules import quant_layers
    from diffquant.tokens.quantization import quantize_token_denoiser, record_token_calibration

    denoiser = _tiny_denoiser()
    calibration = record_token_calibration(denoiser, TINY_SAMPLER, 4)  # its first step is all mask tokens
    options = {"reconstruction": {"weight_iters": 5}} if method == "tfmq" else {}
    quantized = quantize_token_denoiser(denoiser, method, calibration, wbits=4, abits=8, **options)
    assert len(list(quant_layers(quantized))) >= 3
    x, y = torch.randint(0, 17, (4, 49)), torch.arange(4)
    assert torch.isfinite(quantized(x, y)).all()


def test_quantized_token_denoiser_round_trip(tmp_path):
    from diffquant.tokens.quantization import quantize_token_denoiser, record_token_calibration
    from diffquant.tokens.storage import load_token_model, save_quantized_token_denoiser

    denoiser = _tiny_denoiser()
    calibration = record_token_calibration(denoiser, TINY_SAMPLER, 4)
    quantized = quantize_token_denoiser(denoiser, "naive", calibration, wbits=4, abits=8)
    save_quantized_token_denoiser(quantized, tmp_path / "q")
    loaded = load_token_model(tmp_path / "q")
    x, y = torch.randint(0, 17, (4, 49)), torch.arange(4)
    assert torch.equal(loaded(x, y), quantized(x, y)) and not torch.equal(loaded(x, y), denoiser(x, y))
    with pytest.raises(DiffquantError, match="quantized by a diffquant method"):
        save_quantized_token_denoiser(denoiser, tmp_path / "plain")


def test_cli_sample_dispatches_to_a_token_generator(generator_dir, tmp_path):
    from diffquant.cli import app

    out = tmp_path / "samples"
    args = ["sample", "--model", str(generator_dir), "--out", str(out), "-n", "6", "--steps", "2", "--label", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (6, 1, 28, 28) and (saved["labels"] == 3).all()
    assert (str(saved["scheduler"]), int(saved["steps"]), float(saved["guidance_scale"])) == ("maskgit", 2, 2.0)
    assert (out / "samples.png").stat().st_size > 0
    bad = CliRunner().invoke(app, [*args, "--prompt", "a shoe"])
    assert bad.exit_code == 2 and "--prompt does not apply to the token generator" in bad.output
    wrong = CliRunner().invoke(app, [*args, "--scheduler", "ddim"])
    assert wrong.exit_code == 2 and "Unknown token sampler 'ddim'" in wrong.output


@needs_fmnist
def test_cli_eval_dispatches_to_a_token_generator(generator_dir, tmp_path):
    from diffquant.cli import app

    args = ["eval", "--model", str(generator_dir), "--protocol", "smoke", "-n", "20"]
    result = CliRunner().invoke(app, [*args, "--against", str(generator_dir), "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "e.json").read_text())["rows"][0]
    assert math.isfinite(row["metrics"]["fid"]) and row["metrics"]["network_calls"] == 6
    assert row["metrics"]["psnr_vs_ref"] >= 99  # against itself, same seeds: the same images
    assert row["sampler"]["sampler"] == "maskgit" and row["protocol"]["num_samples"] == 20
    bad = CliRunner().invoke(app, [*args, "--backend", "onednn"])
    assert bad.exit_code == 2 and "--backend does not apply to the token generator" in bad.output


def test_loading_a_token_generator_as_a_diffusion_model_says_what_to_do(generator_dir):
    import diffquant

    with pytest.raises(DiffquantError, match="is a token generator, not a diffusion model"):
        diffquant.load(generator_dir)
