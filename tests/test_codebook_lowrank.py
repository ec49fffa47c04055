"""Low-rank + VQ weights (LR²VQ, CodebookSpec.rank): rank 0 is plain VQ, the branch helps, saved packed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.modules.codebook import CodebookLinear, apply_weight_vq, load_codebook_state, save_codebook_state
from diffquant.quant.codebook import CodebookSpec, kmeans_codebook, quantize_weight

FAST = CodebookSpec(refine_steps=0, kmeans_iters=4)


def _low_rank_weight(out: int = 128, inp: int = 128, rank: int = 4) -> torch.Tensor:
    """A weight dominated by a rank-4 part plus small noise (what a low-rank branch is for)."""
    generator = torch.Generator().manual_seed(0)
    strong = torch.randn(out, rank, generator=generator) @ torch.randn(rank, inp, generator=generator)
    return strong + 0.1 * torch.randn(out, inp, generator=generator)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def test_rank_zero_is_the_plain_codebook_layer():
    weight = _low_rank_weight()
    quantized = quantize_weight(weight, replace(FAST, rank=0, branch_refits=3))
    vectors = weight.reshape(-1, 4)
    book = kmeans_codebook(vectors, 256, FAST.kmeans_iters, FAST.seed)
    assert quantized.rank == 0 and quantized.up is None
    assert torch.equal(quantized.codebook, book)
    assert torch.equal(quantized.indices, torch.cdist(vectors, book).argmin(1))
    assert set(quantized.packed()) == {"indices", "codebook"}
    model = _mlp()
    apply_weight_vq(model, FAST)
    assert set(model[0].state_dict()) == {"packed_indices", "codebook", "bias"}  # unchanged layout
    layer = model[0]
    assert torch.equal(
        layer.dense_weight(), layer.codebook.float()[quantize_weight(_mlp()[0].weight, FAST).indices].reshape(128, 64)
    )


def test_low_rank_branch_beats_plain_vq_at_the_same_index_bits():
    weight = _low_rank_weight()
    plain = quantize_weight(weight, FAST)
    lowrank = quantize_weight(weight, replace(FAST, rank=4, branch_refits=0))
    refitted = quantize_weight(weight, replace(FAST, rank=4, branch_refits=2))
    assert lowrank.indices.numel() == plain.indices.numel() and lowrank.codebook.shape == plain.codebook.shape

    def error(q):
        return (q.dequantize() - weight).pow(2).mean().item()

    assert error(lowrank) < 0.5 * error(plain)
    assert error(refitted) <= error(lowrank)  # the first split is one of the candidates kept


def test_refits_keep_the_best_output_error_on_calibration_inputs():
    weight = _low_rank_weight(64, 64)
    inputs = torch.randn(256, 64) * torch.linspace(0.2, 2, 64)
    spec = CodebookSpec(bits_per_weight=1, refine_steps=20, kmeans_iters=4, rank=2)

    def output_error(q):
        return (inputs @ (q.dequantize() - weight).t()).pow(2).mean().item()

    once = quantize_weight(weight, replace(spec, branch_refits=0), inputs)
    refitted = quantize_weight(weight, replace(spec, branch_refits=2), inputs)
    assert output_error(refitted) <= output_error(once)


def test_low_rank_vq_saves_packed_and_loads_to_identical_outputs(tmp_path):
    spec = replace(FAST, rank=4)
    model, x = _mlp(), torch.randn(16, 64)
    report = apply_weight_vq(model, spec, calibrate=lambda: model(torch.randn(32, 64)))
    assert all(isinstance(m, CodebookLinear) and m.rank == 4 for m in (model[0], model[2]))
    assert model[0].branch_up.dtype == torch.float16 and model[0].packed_indices.dtype == torch.uint8
    size = save_codebook_state(model, tmp_path / "lrvq.safetensors")
    fresh = _mlp()
    apply_weight_vq(fresh, replace(spec, seed=7, kmeans_iters=1))
    load_codebook_state(fresh, tmp_path / "lrvq.safetensors")
    assert size == report["packed_bytes"]
    assert torch.equal(fresh(x), model(x))


def test_byte_count_includes_the_branch():
    rank = 4
    model = _mlp()
    report = apply_weight_vq(model, replace(FAST, rank=rank))
    for layer in (model[0], model[2]):
        out, inp = layer.out_features, layer.in_features
        indices, book, branch = out * inp * 2 // 8, 256 * 4 * 2, rank * (out + inp) * 2  # float16: 2 bytes
        assert layer.packed_bytes() == indices + book + branch
        stored = {k: v for k, v in layer.state_dict().items() if k != "bias"}
        assert layer.packed_bytes() == sum(t.numel() * t.element_size() for t in stored.values())
    assert report["branch_bytes"] == rank * (128 + 64) * 2 * 2
    plain = apply_weight_vq(_mlp(), FAST)
    assert report["packed_bytes"] == plain["packed_bytes"] + report["branch_bytes"]
    assert report["compression"] < plain["compression"]


def test_rank_larger_than_the_weight_is_one_config_error():
    with pytest.raises(ConfigError, match=r"rank 65 exceeds min\(out, in\) = 64"):
        quantize_weight(torch.randn(128, 64), replace(FAST, rank=65))
    with pytest.raises(ConfigError, match="rank and branch_refits must be >= 0"):
        quantize_weight(torch.randn(8, 8), replace(FAST, rank=-1))

    def calibrate():
        raise AssertionError("the rank is checked before any calibration run")

    with pytest.raises(ConfigError, match=r"layer '0': rank 100 exceeds"):
        apply_weight_vq(_mlp(), replace(FAST, rank=100), calibrate=calibrate)


def test_token_denoiser_low_rank_vq_option():
    from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
    from diffquant.tokens.quantization import record_token_calibration, vq_token_denoiser
    from diffquant.tokens.samplers import TokenSamplerConfig

    torch.manual_seed(0)
    denoiser = TokenDenoiser(DenoiserConfig(codebook_size=16, num_tokens=9, width=16, depth=1, heads=2)).eval()
    calibration = record_token_calibration(denoiser, TokenSamplerConfig("maskgit", 2, guidance_scale=2.0), 8)
    spec = CodebookSpec(refine_steps=10, kmeans_iters=2, rank=2, branch_refits=1)
    quantized, report = vq_token_denoiser(denoiser, spec, calibration)
    layers = [m for m in quantized.modules() if isinstance(m, CodebookLinear)]
    assert len(layers) == 4 and all(m.rank == 2 for m in layers)  # qkv, proj, fc1, fc2; the head stays
    assert report["rank"] == 2 and report["branch_bytes"] > 0
    x, y = torch.randint(0, 17, (4, 9)), torch.arange(4)
    reference = denoiser(x, y)
    assert 0 < (quantized(x, y) - reference).abs().max() < reference.abs().max()
