"""Token pillar: quantizers, discrete forward process, posterior, samplers, float64 sampling, codec, storage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from diffquant.tokens.categorical import gumbel_from_uniform, sample_categorical
from diffquant.tokens.codec import decode_tokens, encode_tokens, rate_distortion, rebuild_codebook
from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
from diffquant.tokens.entropy import arithmetic_decode, arithmetic_encode
from diffquant.tokens.generator import TokenGenerator
from diffquant.tokens.quantizers import FSQ, FSQConfig, SimVQ, VectorQuantizer, VQConfig
from diffquant.tokens.samplers import SAMPLERS, TokenSamplerConfig, sample_tokens
from diffquant.tokens.schedule import MaskReplaceSchedule, vq_posterior
from diffquant.tokens.storage import load_token_model, save_token_model
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder


def _tiny_tokenizer(kind: str = "vq", k: int = 16) -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(
        TokenizerConfig(
            quantizer=kind, codebook_size=k, latent_dim=4 if kind == "fsq" else 8, width=4, fsq_levels=(4, 3, 3, 2)
        )
    )


def _tiny_denoiser(k: int = 16, tokens: int = 9) -> TokenDenoiser:
    torch.manual_seed(0)
    return TokenDenoiser(DenoiserConfig(codebook_size=k, num_tokens=tokens, width=16, depth=1, heads=2))


@pytest.mark.parametrize("quantizer", [VectorQuantizer(VQConfig(codebook_size=8, dim=4, kmeans_init=False)), SimVQ()])
def test_straight_through_gradient_is_identity(quantizer):
    dim = quantizer.config.dim
    x = torch.randn(32, dim, requires_grad=True)
    out = quantizer.eval()(x)
    (out.quantized * torch.arange(dim)).sum().backward()
    assert torch.equal(x.grad, torch.arange(dim, dtype=torch.float32).expand(32, dim))
    assert torch.allclose(out.quantized, quantizer.embed(out.indices), atol=1e-6)


def test_ema_update_follows_the_formula():
    vq = VectorQuantizer(VQConfig(codebook_size=2, dim=2, kmeans_init=False, decay=0.9, restart_every=0))
    vq.set_codebook(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])  # all nearest to code 0
    vq.train()(x)
    assert torch.allclose(vq.ema_count, torch.tensor([0.9 + 0.1 * 3, 0.9]))
    assert torch.allclose(vq.ema_sum[0], 0.1 * x.sum(0))
    n = vq.ema_count.sum()
    smoothed = (vq.ema_count + 1e-5) / (n + 2e-5) * n
    assert torch.allclose(vq.codebook[0], 0.1 * x.sum(0) / smoothed[0])
    assert vq.codebook[0].norm() > 0  # moved toward the data mean (1, 1)


def test_dead_code_restart_revives_unused_codes():
    vq = VectorQuantizer(VQConfig(codebook_size=8, dim=2, kmeans_init=False, restart_every=2, restart_threshold=1.0))
    far = torch.full((8, 2), 100.0)
    far[0] = 0.0
    vq.set_codebook(far)
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    vq.train()
    for _ in range(2):
        out = vq(data)
    assert out.stats["restarted"] == 7.0
    assert vq.codebook.abs().max() < 10  # every dead code now sits on a data point
    assert vq.eval()(data).stats["usage"] > 0.5


def test_fsq_grid_is_exact():
    fsq = FSQ(FSQConfig(levels=(8, 5, 3)))
    indices = torch.arange(fsq.codebook_size)
    assert fsq.codebook_size == 120
    grid = fsq.grid_values(indices)
    assert torch.equal((grid * fsq.basis).sum(-1), indices)  # mixed radix is a bijection
    codes = fsq.codes()
    out = fsq(torch.randn(4096, 3, generator=torch.Generator().manual_seed(1)) * 3)
    assert torch.equal(out.quantized, fsq.embed(out.indices))  # forward lands exactly on the grid
    for d, level in enumerate((8, 5, 3)):
        half = level // 2
        expected = (torch.arange(level, dtype=torch.float32) - half) / half
        assert torch.equal(codes[:, d].unique(), expected)
    assert out.stats["usage"] == 1.0


def test_forward_process_matches_transition_matrices():
    k, schedule = 5, MaskReplaceSchedule(steps=6)
    product = torch.eye(k + 1, dtype=torch.float64)
    for t in range(1, 7):
        step = schedule.transition_matrix(k, t - 1, t)
        assert torch.allclose(step.sum(1), torch.ones(k + 1, dtype=torch.float64))
        product = product @ step
        closed = schedule.marginal(torch.arange(k), torch.full((k,), t), k)
        assert torch.allclose(product[:k], closed, atol=1e-12)
        assert torch.allclose(schedule.transition_matrix(k, 0, t), product, atol=1e-12)
    # jumps compose: Q(s -> t) = Q(s -> m) Q(m -> t)
    assert torch.allclose(
        schedule.transition_matrix(k, 1, 5), schedule.transition_matrix(k, 1, 3) @ schedule.transition_matrix(k, 3, 5)
    )
    # samples follow the marginal (q_sample vs the closed form, 40k draws)
    x0 = torch.full((40000, 1), 2)
    xt = schedule.q_sample(x0, torch.full((40000,), 4), k, torch.Generator().manual_seed(0))
    freq = torch.bincount(xt.reshape(-1), minlength=k + 1).double() / 40000
    expected = schedule.marginal(torch.tensor([2]), torch.tensor([4]), k)[0]
    assert torch.allclose(freq, expected, atol=0.01)


def test_posterior_matches_bayes_and_sums_to_one():
    k, schedule = 4, MaskReplaceSchedule(steps=10)
    gen = torch.Generator().manual_seed(0)
    p_x0 = torch.softmax(torch.randn(1, k + 1, k, generator=gen), -1)
    x_t = torch.arange(k + 1)[None]  # every observed class including the mask
    for t, s in ((7, 6), (9, 3), (5, 0)):
        post = vq_posterior(p_x0, x_t, schedule, t, s)
        assert torch.allclose(post.sum(-1), torch.ones(1, k + 1, dtype=torch.float64))
        q_s = schedule.transition_matrix(k, 0, s)[:k]  # q(x_s | x0)
        q_ts = schedule.transition_matrix(k, s, t)  # q(x_t | x_s)
        q_t = schedule.transition_matrix(k, 0, t)[:k]  # q(x_t | x0)
        for j in range(k + 1):
            brute = sum(p_x0[0, j, x0].double() * q_s[x0] * q_ts[:, j] / q_t[x0, j] for x0 in range(k))
            assert torch.allclose(post[0, j], brute / brute.sum(), atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_seeded_and_leave_no_mask(sampler):
    denoiser = _tiny_denoiser()
    labels = torch.tensor([0, 1, 2, 3])
    for steps, guidance in ((3, 1.0), (5, 3.0)):
        config = TokenSamplerConfig(sampler=sampler, steps=steps, guidance_scale=guidance, truncation=0.9)
        a = sample_tokens(denoiser, 4, config, labels, seed=7)
        b = sample_tokens(denoiser, 4, config, labels, seed=7)
        c = sample_tokens(denoiser, 4, config, labels, seed=8)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape == (4, 9) and a.min() >= 0 and a.max() < 16


def test_first_hitting_with_one_event_per_call_is_exact_and_counts_calls():
    denoiser = _tiny_denoiser()
    config = TokenSamplerConfig(sampler="fhs", steps=9)
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    handle = denoiser.register_forward_hook(count)
    sample_tokens(denoiser, 3, config, seed=0)
    handle.remove()
    assert calls == 9 == config.network_calls(9)


def test_float64_categorical_matches_target_distribution():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64)
    draws = sample_categorical(probs.log().expand(200000, 6), torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=6).numpy()
    assert chisquare(observed, (probs * 200000).numpy()).pvalue > 0.01


def test_float32_gumbel_lowers_the_temperature_and_float64_does_not():
    # a rare class 17 nats below the head wins when g1 - 17 > g0: P = sigmoid(-17) exactly.
    # Enumerate the float32 uniform grid (torch draws multiples of 2^-24) for g1, integrate g0 exactly.
    assert (torch.rand(10000, generator=torch.Generator().manual_seed(0)) * 2**24).frac().abs().max() == 0
    delta = 17.0
    exact = 1 / (1 + math.exp(delta))
    top = 2**20  # grid points above 1 - 2^-4; below them the win probability is < 1e-300
    u32 = (torch.arange(2**24 - top, 2**24, dtype=torch.float64) / 2**24).float()
    g1 = gumbel_from_uniform(u32).double()
    p32 = (torch.exp(-torch.exp(-(g1 - delta))).sum() / 2**24).item()
    assert g1.max().item() < 16.7  # the float32 ceiling on the noise
    assert p32 < 0.6 * exact  # the rare class is under-sampled: a lower effective temperature
    # float64: the ceiling is ~36.7, far above the gap, and the same grid sum at 2^-53 spacing is exact
    u64_max = torch.tensor(1 - 2**-53, dtype=torch.float64)
    assert gumbel_from_uniform(u64_max).item() > 36.0
    draws = sample_categorical(torch.tensor([0.0, -4.0]).expand(400000, 2), torch.Generator().manual_seed(1))
    rare = 1 / (1 + math.exp(4.0))
    assert abs(draws.double().mean().item() - rare) < 4 * math.sqrt(rare * (1 - rare) / 400000)


def test_arithmetic_coder_round_trip():
    rng = np.random.default_rng(0)
    for alphabet in (2, 17, 4096):
        symbols = rng.zipf(1.7, 3000) % alphabet
        assert np.array_equal(arithmetic_decode(arithmetic_encode(symbols, alphabet), len(symbols), alphabet), symbols)


@pytest.mark.parametrize("coder", ["arithmetic", "lzma"])
def test_codec_round_trip_bit_exact_and_rate_is_counted(coder):
    tokenizer = _tiny_tokenizer().eval()
    images = torch.rand(12, 1, 28, 28) * 2 - 1
    tokens = tokenizer.encode(images)
    encoded = encode_tokens(tokens, tokenizer.codebook_size, coder)
    assert torch.equal(decode_tokens(encoded.data), tokens)
    report = rate_distortion(tokenizer, images, coder)
    assert report["bpp_coded"] == encoded.payload_bits / images.numel()
    assert report["bpp_file"] == 8 * len(encoded.data) / images.numel()
    assert report["bpp_raw"] == 49 * 4 / 784


def test_rebuilt_codebook_ladder_rung():
    tokenizer = _tiny_tokenizer()
    pool = torch.randn(500, 8)
    rung = rebuild_codebook(tokenizer, pool, 32, iters=3)
    assert rung.codebook_size == 32 and rung.quantizer.codebook.shape == (32, 8)
    assert torch.equal(rung.decoder[0].weight, tokenizer.decoder[0].weight)


@pytest.mark.parametrize("kind", ["vq", "simvq", "fsq", "rvq"])
def test_tokenizer_save_load_identical(kind, tmp_path):
    tokenizer = _tiny_tokenizer(kind).train()
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    tokenizer(images)  # k-means init and EMA statistics are part of the state
    tokenizer.eval()
    save_token_model(tokenizer, tmp_path / kind)
    loaded = load_token_model(tmp_path / kind)
    for (name, a), (_, b) in zip(tokenizer.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    assert torch.equal(loaded.decode(loaded.encode(images)), tokenizer.decode(tokenizer.encode(images)))


def test_generator_save_load_identical(tmp_path):
    tokenizer = _tiny_tokenizer()
    denoiser = TokenDenoiser(DenoiserConfig(codebook_size=16, num_tokens=49, width=16, depth=1, heads=2))
    generator = TokenGenerator(tokenizer.eval(), denoiser.eval(), "tiny")
    generator.save(tmp_path / "gen")
    loaded = TokenGenerator.load(tmp_path / "gen")
    config = TokenSamplerConfig(sampler="maskgit", steps=4, guidance_scale=2.0)
    a, _ = generator.generate(6, config, seed=3)
    b, _ = loaded.generate(6, config, seed=3)
    assert torch.equal(a, b) and a.shape == (6, 1, 28, 28)


def test_cli_compress_decompress_round_trip(tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app

    tokenizer = _tiny_tokenizer().eval()
    save_token_model(tokenizer, tmp_path / "tok")
    images = (np.random.default_rng(0).random((5, 28, 28)) * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    runner = CliRunner()
    args = [
        "compress",
        str(tmp_path / "images.npy"),
        "-o",
        str(tmp_path / "x.dqt"),
        "--tokenizer",
        str(tmp_path / "tok"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    size = (tmp_path / "x.dqt").stat().st_size
    assert f"{8 * size / (5 * 784):.4f} bpp" in result.output  # the printed rate is the file's bits
    args = ["decompress", str(tmp_path / "x.dqt"), "-o", str(tmp_path / "y.npy"), "--tokenizer", str(tmp_path / "tok")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    decoded = np.load(tmp_path / "y.npy")
    from diffquant.data import to_uint8, to_unit_range

    expected = to_uint8(tokenizer.decode(tokenizer.encode(to_unit_range(images[:, None]))))[:, 0].numpy()
    assert np.array_equal(decoded, expected)


def test_weight_vq_packs_two_bits_per_weight_and_round_trips(tmp_path):
    from diffquant.modules.codebook import CodebookLinear, apply_weight_vq, load_codebook_state, save_codebook_state
    from diffquant.quant.codebook import CodebookSpec, CodebookWeight, quantize_weight

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 512)
    weight = quantize_weight(layer.weight, CodebookSpec(refine_steps=0, kmeans_iters=4))
    packed = weight.packed()
    assert packed["indices"].dtype == torch.uint8 and packed["indices"].numel() == 512 * 128 * 2 // 8
    restored = CodebookWeight.from_packed(packed, (512, 128))
    assert torch.equal(restored.indices, weight.indices)
    assert torch.equal(restored.dequantize(), weight.codebook.half().float()[weight.indices].reshape(512, 128))
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    report = apply_weight_vq(model, CodebookSpec(refine_steps=0, kmeans_iters=4))
    assert report["compression"] >= 12.0  # 2-bit indices + a float16 codebook vs fp32
    assert isinstance(model[0], CodebookLinear)
    x = torch.randn(4, 128)
    size = save_codebook_state(model, tmp_path / "vq.safetensors")
    assert size == report["packed_bytes"]
    fresh = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    apply_weight_vq(fresh, CodebookSpec(refine_steps=0, kmeans_iters=1, seed=5))
    load_codebook_state(fresh, tmp_path / "vq.safetensors")
    assert torch.equal(fresh(x), model(x))


def test_vq4dit_candidate_refinement_lowers_output_error():
    from diffquant.quant.codebook import CodebookSpec, quantize_weight

    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    inputs = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)  # uneven channels: data-aware assignment matters
    target = inputs @ weight.t()

    def error(spec, calibration):
        return (inputs @ quantize_weight(weight, spec, calibration).dequantize().t() - target).pow(2).mean().item()

    plain = error(CodebookSpec(bits_per_weight=1, refine_steps=0), None)  # k-means on the weights alone
    weighted = error(CodebookSpec(bits_per_weight=1, refine_steps=0), inputs)  # input-moment weighted k-means
    refined = error(CodebookSpec(bits_per_weight=1, refine_steps=150, candidates=4), inputs)
    assert refined < weighted < 0.98 * plain


@pytest.mark.parametrize("method", ["naive", "ptq4dm"])
def test_token_denoiser_through_quantization_methods(method):
    from diffquant.modules import quant_layers
    from diffquant.tokens.quantization import quantize_token_denoiser, record_token_calibration

    denoiser = _tiny_denoiser().eval()
    sampler = TokenSamplerConfig("maskgit", 3, guidance_scale=2.0)
    calibration = record_token_calibration(denoiser, sampler, 16)
    assert len(calibration) == 16 * 2 * 3  # every network call, both CFG branches
    quantized = quantize_token_denoiser(denoiser, method, calibration, wbits=8, abits=8)
    assert len(list(quant_layers(quantized))) == 5  # qkv, proj, fc1, fc2, head
    x, y = torch.randint(0, 17, (8, 9)), torch.arange(8)
    reference = denoiser(x, y)
    assert 0 < (quantized(x, y) - reference).abs().max() < 0.1 * reference.abs().max()
    tokens = sample_tokens(quantized, 4, sampler, torch.arange(4), seed=0)
    assert tokens.max() < 16


def test_refit_rebuilds_codebook_and_fine_tunes_decoder_only():
    from diffquant.tokens.codec import refit_tokenizer

    tokenizer = _tiny_tokenizer().eval()
    levels = torch.linspace(-0.9, 0.9, 64)[:, None, None, None]
    images = levels * torch.ones(64, 1, 28, 28)  # flat images: a decoder can learn them from the codes
    refit, losses = refit_tokenizer(tokenizer, images, 8, steps=40, batch_size=32, learning_rate=1e-2, pool_size=2000)
    assert refit.codebook_size == 8
    assert torch.equal(refit.encoder[0].weight, tokenizer.encoder[0].weight)  # encoder frozen
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the decoder adapts to the new codebook


def test_cli_tokens_sample_writes_a_grid(tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app

    denoiser = TokenDenoiser(DenoiserConfig(codebook_size=16, num_tokens=49, width=16, depth=1, heads=2))
    TokenGenerator(_tiny_tokenizer().eval(), denoiser.eval(), "tiny").save(tmp_path / "gen")
    args = ["tokens", "sample", "--model", str(tmp_path / "gen"), "--out", str(tmp_path / "grid.png"), "-n", "10"]
    result = CliRunner().invoke(app, [*args, "--sampler", "fhs", "--steps", "4", "--guidance", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    bad = CliRunner().invoke(app, [*args, "--sampler", "nope"])
    assert bad.exit_code == 2 and "Unknown token sampler" in bad.output


def test_resgen_collective_embedding_trains_and_samples_every_depth():
    from diffquant.tokens.quantizers import ResidualVQ, ResidualVQConfig
    from diffquant.tokens.resgen import ResGenConfig, ResGenDenoiser, resgen_loss, sample_resgen, split_sums

    torch.manual_seed(0)
    rvq = ResidualVQ(ResidualVQConfig(depth=2, stage=VQConfig(codebook_size=8, dim=4, kmeans_init=False))).eval()
    tokens = torch.randint(0, 8, (16, 9, 2))
    known, hidden = split_sums(rvq, tokens, torch.full((16, 9), 1))
    assert torch.allclose(known + hidden, rvq.embed(tokens), atol=1e-6)  # the two sums split the latent
    assert torch.allclose(known, rvq.stages[0].embed(tokens[..., 0]))  # one masked depth = the finest one
    model = ResGenDenoiser(ResGenConfig(latent_dim=4, depth=2, num_tokens=9, width=16, layers=1, heads=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    labels = torch.zeros(16, dtype=torch.long)
    losses = []
    for step in range(40):
        loss = resgen_loss(model, rvq, tokens, labels, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    a = sample_resgen(model, rvq, torch.arange(3), steps=4, generator=torch.Generator().manual_seed(0))
    b = sample_resgen(model, rvq, torch.arange(3), steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 9, 2) and a.max() < 8


def _write_idx(path, array) -> None:
    """An uncompressed IDX file (big-endian magic and dimensions, uint8 payload), as Fashion-MNIST ships."""
    import struct

    magic = 2051 if array.ndim == 3 else 2049
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_top_level_train_builds_a_token_generator(tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app
    from diffquant.tokens.generator import TokenGenerator

    rng = np.random.default_rng(0)
    for stem, count in (("train", 96), ("t10k", 32)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, count, dtype=np.uint8))
    run = tmp_path / "run"
    args = ["train", "--model", "fmnist-vq", "--steps", "2", "--batch-size", "16", "--run-dir", str(run)]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    generator = TokenGenerator.load(run / "model")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokenizer"]["steps"] == 2 and summary["denoiser"]["steps"] == 2
    assert 0.0 < summary["tokenizer"]["test"]["usage"] <= 1.0
    card = json.loads((run / "model" / "diffquant.json").read_text())["training"]
    assert card["command"].startswith("diffquant ") and card["wall_minutes"] > 0
    assert generator.denoiser.config.num_tokens == 49


@pytest.mark.parametrize("args", [["--denoiser-depth", "0"], ["--denoiser-width", "130"], ["--tokenizer-width", "2"]])
def test_tokens_train_refuses_bad_sizes_with_one_clear_error(tmp_path, args):
    from typer.testing import CliRunner

    from diffquant.cli import app

    result = CliRunner().invoke(app, ["tokens", "train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "model").exists()
