"""4-bit activations: block-scaled float formats, dynamic group activations, group weights, smoothing,
the low-rank layer kind, Hadamard rotation, GPTQ, the MILP bit allocator and the svdquant method."""

from __future__ import annotations

import pytest
import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant import Quantizer, QuantSpec, group_view, parse_format
from diffquant.quant.formats import ScaledFloatFormat
from diffquant.quant.functional import block_scales
from diffquant.quant.microscaling import (
    decode_blocks,
    e8m0_decode,
    e8m0_encode,
    element_grid,
    encode_blocks,
)

E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# --- 1. block-scaled float formats ------------------------------------------------------------------
def test_e2m1_element_grid_is_the_spec_table():
    grid = element_grid(parse_format("mxfp4"))
    # OCP MX v1.0 table: codes 0-7 are +0 .. +6, codes 8-15 the same with the sign bit
    assert grid[:8].tolist() == E2M1_MAGNITUDES
    assert grid[8:].tolist() == [-v for v in E2M1_MAGNITUDES]
    assert torch.signbit(grid[8])  # code 8 is -0


def test_e8m0_codes_cover_every_power_of_two():
    codes = torch.arange(255, dtype=torch.uint8)
    scales = e8m0_decode(codes)
    assert torch.equal(scales, torch.exp2(torch.arange(-127, 128, dtype=torch.float64)).float())
    assert torch.equal(e8m0_encode(scales), codes)
    assert torch.isnan(e8m0_decode(torch.tensor([255], dtype=torch.uint8))).all()
    with pytest.raises(DiffquantError):
        e8m0_encode(torch.tensor([3.0]))


@pytest.mark.parametrize("name,emax", [("mxfp4", 2), ("mxfp8", 8), ("mxfp8_e5m2", 15), ("mxfp6_e3m2", 4)])
def test_mx_shared_scale_is_floor_log2_amax_minus_emax(name, emax):
    fmt = parse_format(name)
    amax = torch.tensor([6.0, 7.0, 8.0, 0.75, 1e-30, 3.0 * 2.0**100])
    expected = torch.exp2(torch.floor(torch.log2(amax.double())) - emax).clamp(2.0**-127, 2.0**127).float()
    assert torch.equal(block_scales(amax, fmt), expected)
    assert block_scales(torch.tensor([0.0]), fmt).item() == 2.0**-127  # all-zero block: smallest scale


def test_mxfp4_rounding_ties_saturation_and_zeros():
    fmt = parse_format("mxfp4")
    # block amax 4 -> scale 2^(2-2) = 1: elements are the E2M1 values themselves
    block = torch.zeros(1, 32)
    values = [4.0, 2.5, 5.0, 0.25, 0.75, 1.25, 3.5, -0.25, -5.0, 0.1, 1.75, 0.0]
    block[0, : len(values)] = torch.tensor(values)
    decoded = decode_blocks(encode_blocks(block, fmt), fmt)[0, : len(values)]
    # ties to even mantissa: 2.5 -> 2, 5 -> 4, 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 3.5 -> 4, 1.75 -> 2
    assert decoded.tolist() == [4.0, 2.0, 4.0, 0.0, 1.0, 1.0, 4.0, -0.0, -4.0, 0.0, 2.0, 0.0]
    # amax 7: floor(log2 7) = 2 -> scale 1, so 7 saturates to 6 (spec: clamp to max normal)
    block[0, 0] = 7.0
    assert decode_blocks(encode_blocks(block, fmt), fmt)[0, 0].item() == 6.0
    zeros = torch.zeros(2, 32)
    encoded = encode_blocks(zeros, fmt)
    assert encoded.scales.tolist() == [0, 0] and torch.equal(decode_blocks(encoded, fmt), zeros)


def test_mx_matches_torchao_reference():
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=generator) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=generator))
    for name, dtype in (("mxfp8", torch.float8_e4m3fn), ("mxfp4", torch.float4_e2m1fn_x2)):
        fmt = parse_format(name)
        scale, data = mx_tensor.to_mx(x, dtype, 32)
        reference = mx_tensor.to_dtype(data, scale, dtype, 32, torch.float32)
        ours = decode_blocks(encode_blocks(x.reshape(-1, 32), fmt), fmt).reshape(x.shape)
        assert torch.equal(ours, reference), name
        assert torch.equal(encode_blocks(x.reshape(-1, 32), fmt).scales, scale.view(torch.uint8).reshape(-1))


def test_nvfp4_scales_are_e4m3_times_the_tensor_scale():
    fmt = parse_format("nvfp4")
    assert isinstance(fmt, ScaledFloatFormat) and fmt.block == 16 and fmt.storage_bits == 4
    generator = torch.Generator().manual_seed(1)
    view = torch.randn(32, 16, generator=generator) * torch.rand(32, 1, generator=generator) * 10
    view[3] = 0.0  # an all-zero block
    encoded = encode_blocks(view, fmt)
    tensor_scale = view.abs().max() / (6 * 448)
    assert encoded.tensor_scale.item() == pytest.approx(tensor_scale.item(), rel=0, abs=0)
    e4m3 = torch.tensor(encoded.scales.tolist(), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    # block scale = E4M3(amax / 6 / t), computed with torch's own E4M3 conversion
    expected = (view.abs().amax(1) / 6 / tensor_scale).to(torch.float8_e4m3fn).float()
    expected[3] = 2.0**-9  # a zero block keeps the smallest subnormal scale (its values stay zero)
    assert torch.equal(e4m3, expected)
    assert e4m3.max().item() == 448.0  # the largest block uses the top of E4M3
    decoded = decode_blocks(encoded, fmt)
    assert torch.equal(decoded[3], torch.zeros(16))
    # every decoded value is an E2M1 value times its block's decoded scale, and the nearest one
    scales = (e4m3 * tensor_scale)[:, None]
    ratio = (decoded / scales).abs().flatten()
    grid = torch.tensor(E2M1_MAGNITUDES)
    assert ((ratio[:, None] - grid).abs().amin(1) < 1e-6).all()  # up to the fp32 product scale * code
    assert ((view - decoded).abs() <= scales * 1.0 + 1e-12).all()  # within half the widest E2M1 gap (2)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "mxfp8"])
def test_quantizer_simulation_equals_the_stored_encoding(name):
    fmt = parse_format(name)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    quantizer = Quantizer(QuantSpec(name, granularity="group", group_size=fmt.block))
    quantizer.calibrate_static(weight)
    simulated = quantizer(weight)
    stored = decode_blocks(encode_blocks(group_view(weight, quantizer.grouping), fmt), fmt).reshape(weight.shape)
    assert torch.equal(simulated, stored)


def test_scaled_formats_need_their_block_size():
    with pytest.raises(ConfigError, match="group_size=16"):
        QuantSpec("nvfp4", granularity="per_channel")
    with pytest.raises(ConfigError, match="group_size=32"):
        QuantSpec("mxfp4", granularity="group", group_size=16)
    with pytest.raises(ConfigError, match="dynamic=True"):
        QuantSpec("int4", granularity="token_group", group_size=64)


# --- 2. dynamic per-token and per-group activations ---------------------------------------------------
def _reference_dynamic_group(x: torch.Tensor, bits: int, group: int, channel_axis: int) -> torch.Tensor:
    """Plain loops: symmetric int grid, one absmax scale per (token, channel group)."""
    moved = x.movedim(channel_axis, -1).contiguous()
    out = torch.empty_like(moved)
    flat_in, flat_out = moved.reshape(-1, moved.shape[-1]), out.view(-1, moved.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    for t in range(flat_in.shape[0]):
        for start in range(0, flat_in.shape[1], group):
            chunk = flat_in[t, start : start + group]
            scale = max(chunk.abs().max().item() / qmax, 1e-8)
            flat_out[t, start : start + group] = torch.clamp(torch.round(chunk / scale), -qmax - 1, qmax) * scale
    return out.movedim(-1, channel_axis)


@pytest.mark.parametrize("shape,axis", [((2, 5, 128), 2), ((2, 64, 3, 3), 1)])
def test_dynamic_group_activations_match_a_reference(shape, axis):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 3
    quantizer = Quantizer(QuantSpec("int4", granularity="token_group", group_size=32, dynamic=True))
    assert quantizer.calibrated
    assert torch.allclose(quantizer(x), _reference_dynamic_group(x, 4, 32, axis), atol=1e-6, rtol=0)
    per_token = Quantizer(QuantSpec("int4", granularity="per_token", dynamic=True))
    assert torch.allclose(per_token(x), _reference_dynamic_group(x, 4, shape[axis], axis), atol=1e-6, rtol=0)


# --- 4-6. smoothing, low-rank layer kind, Hadamard rotation -------------------------------------------
from torch import nn  # noqa: E402

from diffquant.engines.allocation import allocate_bits, budget_for_average_bits  # noqa: E402
from diffquant.engines.gptq import GPTQConfig, HessianAccumulator, gptq_layer  # noqa: E402
from diffquant.engines.smoothing import (  # noqa: E402
    channel_absmax,
    search_smoothing,
    smoothing_scales,
    weight_channel_absmax,
)
from diffquant.modules import LowRankQuantLayer, QuantLinear  # noqa: E402
from diffquant.quant.rotation import hadamard, rotation_matrix  # noqa: E402


def _outlier_inputs(shape, channel_axis, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    boost = torch.ones(shape[channel_axis])
    boost[:: max(1, shape[channel_axis] // 4)] = 30.0  # a few outlier channels, as in diffusion activations
    view = [1] * len(shape)
    view[channel_axis] = -1
    return x * boost.reshape(view)


@pytest.mark.parametrize("conv", [False, True])
def test_smoothing_rotation_and_full_rank_leave_the_float_output_unchanged(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 24, 3, padding=1) if conv else nn.Linear(32, 24)
    x = _outlier_inputs((2, 32, 5, 5) if conv else (2, 7, 32), 1 if conv else 2)
    expected = layer(x)
    full_rank = min(24, layer.weight[0].numel())
    for rotate in (False, True):
        for rank in (0, 8, full_rank):
            wrapped = LowRankQuantLayer(layer, None, None, rank=rank, rotate=rotate)
            smooth = smoothing_scales(channel_absmax(x, 1 if conv else 2), weight_channel_absmax(layer.weight), 0.5)
            wrapped.decompose(layer.weight, smooth, rank)
            assert torch.allclose(wrapped(x), expected, atol=1e-4, rtol=1e-4), (rotate, rank)
    # rank = full: the branch alone is the (transformed) float layer; the residual holds only its 16-bit rounding
    wrapped = LowRankQuantLayer(layer, QuantSpec("int4", granularity="per_channel"), None, rank=full_rank)
    wrapped.decompose(layer.weight, rank=full_rank)
    assert wrapped.residual.weight.abs().max() < 1e-3 * layer.weight.abs().max()
    assert torch.allclose(wrapped(x), expected, atol=1e-3, rtol=1e-3)  # equal to 16-bit precision


def test_hadamard_rotation_is_orthogonal():
    for size in (1, 2, 16, 64):
        h = hadamard(size)
        assert torch.allclose(h @ h.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(h.abs(), torch.full_like(h, size**-0.5))
    for channels in (96, 24, 7):
        r = rotation_matrix(channels)
        assert torch.allclose(r @ r.T, torch.eye(channels), atol=1e-6)
    with pytest.raises(ConfigError):
        hadamard(12)


def test_rotation_spreads_an_outlier_channel_and_lowers_a4_error():
    torch.manual_seed(1)
    layer = nn.Linear(64, 32)
    x = torch.randn(4, 16, 64)
    x[..., 5] *= 50  # one outlier channel: per-token 4-bit scales waste their grid on it
    target = layer(x).detach()
    specs = (QuantSpec("int8", granularity="per_channel"), QuantSpec("int4", granularity="per_token", dynamic=True))
    errors = {}
    for rotate in (False, True):
        wrapped = LowRankQuantLayer(layer, *specs, rank=0, rotate=rotate)
        wrapped.decompose(layer.weight)
        with torch.no_grad():
            errors[rotate] = float((wrapped(x) - target).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]


def test_smoothing_search_beats_no_smoothing_and_keeps_its_choice():
    torch.manual_seed(2)
    layer = nn.Linear(64, 48)
    x = _outlier_inputs((4, 16, 64), 2, seed=2)
    target = layer(x).detach()
    specs = (
        QuantSpec("int4", granularity="group", group_size=32),
        QuantSpec("int4", granularity="token_group", group_size=32, dynamic=True),
    )
    wrapped = LowRankQuantLayer(layer, *specs, rank=4)
    result = search_smoothing(wrapped, layer.weight, x, target, channel_absmax(x, 2), (0.25, 0.5, 0.75), rank=4)
    assert result.alpha is not None and result.error < 0.7 * result.baseline_error
    assert float((wrapped(x) - target).pow(2).mean()) == pytest.approx(result.error)


def test_lora_on_the_low_rank_kind_adds_exactly_its_delta():
    torch.manual_seed(3)
    layer = nn.Linear(32, 16)
    x = _outlier_inputs((3, 32), 1, seed=3)
    wrapped = LowRankQuantLayer(layer, None, None, rank=4, rotate=True)
    wrapped.decompose(layer.weight, smoothing_scales(channel_absmax(x, 1), weight_channel_absmax(layer.weight), 0.5))
    down, up = torch.randn(2, 32), torch.randn(16, 2)
    wrapped.add_lora(down, up, scale=0.5)
    assert wrapped.rank == 6
    expected = layer(x) + 0.5 * x @ down.T @ up.T
    assert torch.allclose(wrapped(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="LoRA shapes"):
        wrapped.add_lora(torch.randn(2, 31), up)


# --- 7. GPTQ --------------------------------------------------------------------------------------------
def _trained_mlp() -> tuple[nn.Sequential, torch.Tensor]:
    """A small MLP trained for ~1 s on correlated inputs (so the input Hessian is far from diagonal)."""
    generator = torch.Generator().manual_seed(4)
    mixing = torch.randn(8, 64, generator=generator)
    inputs = torch.randn(2048, 8, generator=generator) @ mixing + 0.1 * torch.randn(2048, 64, generator=generator)
    targets = torch.sin(inputs[:, :4]).sum(1, keepdim=True)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return model, inputs


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int3", granularity="per_channel"),
        QuantSpec("int4", granularity="group", group_size=16),
        QuantSpec("nvfp4", granularity="group", group_size=16),
    ],
)
def test_gptq_beats_round_to_nearest_on_a_trained_layer(spec):
    model, inputs = _trained_mlp()
    float_layer = model[0]
    target = float_layer(inputs).detach()
    errors = {}
    for method in ("rtn", "gptq"):
        layer = QuantLinear(float_layer, spec, None)
        layer.weight = nn.Parameter(float_layer.weight.detach().clone())
        layer.calibrate_weight()
        if method == "gptq":
            accumulator = HessianAccumulator(layer)
            accumulator.add(inputs[:1024])
            gptq_layer(layer, accumulator.hessian, GPTQConfig())
            before_freeze = layer.dequantized_weight().detach().clone()
            assert torch.equal(before_freeze, layer.weight.detach())  # already on the grid
            layer.freeze()
            assert torch.equal(layer.dequantized_weight(), before_freeze)  # codes reproduce it exactly
        with torch.no_grad():
            errors[method] = float((layer(inputs[1024:]) - target[1024:]).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_on_a_conv_uses_unfolded_patches():
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(16, 8, 6, 6).cumsum(1)  # correlated channels
    accumulator = HessianAccumulator(conv)
    accumulator.add(x)
    assert accumulator.hessian.shape == (72, 72) and accumulator.rows == 16 * 36
    from diffquant.modules import QuantConv2d

    errors = {}
    for method in ("rtn", "gptq"):
        layer = QuantConv2d(conv, QuantSpec("int3", granularity="per_channel"), None)
        layer.weight = nn.Parameter(conv.weight.detach().clone())
        layer.calibrate_weight()
        if method == "gptq":
            gptq_layer(layer, accumulator.hessian)
        with torch.no_grad():
            errors[method] = float((layer(x) - conv(x)).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


# --- 8. MILP bit allocation -----------------------------------------------------------------------------
def test_milp_allocation_is_optimal_and_meets_the_budget():
    import itertools

    generator = torch.Generator().manual_seed(6)
    layers = [f"layer{i}" for i in range(5)]
    sizes = {name: int(s) for name, s in zip(layers, torch.randint(10, 100, (5,), generator=generator), strict=True)}
    sensitivity = {
        name: {bits: float(torch.rand(1, generator=generator)) * 2.0 ** (8 - bits) for bits in (2, 4, 8)}
        for name in layers
    }
    budget = budget_for_average_bits(sizes, 4.5)
    best = None
    for combo in itertools.product((2, 4, 8), repeat=5):
        used = sum(sizes[n] * b for n, b in zip(layers, combo, strict=True))
        if used <= budget:
            cost = sum(sensitivity[n][b] for n, b in zip(layers, combo, strict=True))
            best = cost if best is None or cost < best else best
    allocation = allocate_bits(sensitivity, sizes, budget)
    assert allocation.total_bits <= budget
    assert allocation.total_bits == sum(sizes[n] * allocation.bits[n] for n in layers)
    assert allocation.cost == pytest.approx(best)
    # exact mode: the budget is used to the last bit when some allocation does so
    exact_budget = sum(sizes[n] * b for n, b in zip(layers, (2, 8, 4, 4, 2), strict=True))
    exact = allocate_bits(sensitivity, sizes, exact_budget, exact=True)
    assert exact.total_bits == exact_budget
    with pytest.raises(DiffquantError, match="No bit allocation"):
        allocate_bits(sensitivity, sizes, 10)


# --- 3. group-wise weights for every method; save -> load -> export of the low-rank kind ---------------
import diffquant  # noqa: E402
from diffquant.methods import make_config  # noqa: E402
from diffquant.methods.svdquant import branch_rank  # noqa: E402
from diffquant.modules import quant_layers  # noqa: E402
from diffquant.runtime.export import export_model  # noqa: E402
from tests.conftest import relative_error  # noqa: E402


def _output(model, seed: int = 0) -> torch.Tensor:
    from diffquant.quant import step_context

    x = torch.randn((4, *model.info.image_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), step_context(0, 900, 10):
        return model.denoiser(x, torch.full((4,), 900)).sample


@pytest.mark.parametrize("method", ["naive", "ptq4dm", pytest.param("qdiffusion", marks=pytest.mark.slow)])
def test_every_method_takes_group_wise_weights(method, trained_unet, calibration, tmp_path):
    options = {"wbits": 4, "abits": 8, "weight_group_size": 32}
    if method == "qdiffusion":
        options["reconstruction"] = {"weight_iters": 2, "act_iters": 2, "batch_size": 8}
        options["checkpoint_dir"] = str(tmp_path / "ckpt")
    config = make_config(method, **options)
    quantized = diffquant.quantize(trained_unet, config, calibration, progress=False)
    layers = dict(quant_layers(quantized.denoiser))
    spec = layers["down_blocks.1.resnets.0.conv2"].weight_quantizer.spec  # 32 x 3 x 3 inputs
    assert (spec.granularity, spec.group_size) == ("group", 32)
    assert layers["conv_in"].weight_quantizer.spec.group_size == 9  # gcd(1 x 3 x 3, 32): the group fits the layer
    diffquant.save(quantized, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    assert reloaded.quantization["config"]["weight_group_size"] == 32
    reloaded_spec = dict(quant_layers(reloaded.denoiser))["down_blocks.1.resnets.0.conv2"].weight_quantizer.spec
    assert reloaded_spec == spec
    assert torch.equal(_output(quantized), _output(reloaded))


def test_group_weights_beat_per_channel_at_w3(trained_unet, calibration, held_out):
    errors = {}
    for group in (None, 16):
        quantized = diffquant.quantize(
            trained_unet, "naive", calibration, progress=False, wbits=3, abits=None, weight_group_size=group
        )
        errors[group] = relative_error(trained_unet, quantized, held_out)
    assert errors[16] < errors[None], errors


@pytest.fixture(scope="module")
def svdquant_unet(trained_unet, calibration):
    return diffquant.quantize(trained_unet, "svdquant", calibration, progress=False, preset="fast", rank=8)


def test_svdquant_w4a4_is_far_better_than_naive_w4a4(trained_unet, calibration, held_out, svdquant_unet):
    naive = diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=4, abits=4)
    ours, theirs = relative_error(trained_unet, svdquant_unet, held_out), relative_error(trained_unet, naive, held_out)
    assert ours < 0.25 * theirs, (ours, theirs)
    details = svdquant_unet.quantization["details"]
    assert "conv_in" in details["kept_16bit"] and "time_embedding.linear_1" in details["kept_16bit"]
    assert details["lowrank_layers"] > 0


def test_svdquant_reconstruction_beats_gptq_and_trains_a_16bit_branch(
    trained_unet, calibration, held_out, svdquant_unet, tmp_path
):
    # block AdaRound with the 4-bit activations on, the branch trained beside it (`reconstructed` preset)
    options = {"rank": 8, "checkpoint_dir": str(tmp_path / "ckpt")}
    options["reconstruction"] = {"weight_iters": 400, "batch_size": 16, "float_lr": 1e-4}
    rebuilt = diffquant.quantize(
        trained_unet, "svdquant", calibration, progress=False, preset="reconstructed", **options
    )
    nearest = diffquant.quantize(
        trained_unet, "svdquant", calibration, progress=False, preset="fast", rank=8, gptq=False
    )
    ours, gptq = relative_error(trained_unet, rebuilt, held_out), relative_error(trained_unet, svdquant_unet, held_out)
    rtn = relative_error(trained_unet, nearest, held_out)
    assert ours < gptq < rtn and ours < 0.8 * rtn, (ours, gptq, rtn)
    name = "down_blocks.1.resnets.0.conv2"
    trained, initial = rebuilt.denoiser.get_submodule(name), svdquant_unet.denoiser.get_submodule(name)
    assert not torch.equal(trained.lora_up, initial.lora_up)  # the branch moved off its SVD start
    assert torch.equal(trained.lora_up, trained.lora_up.half().float())  # and stays what 16 bits hold
    assert not trained.lora_up.requires_grad
    assert not any((tmp_path / "ckpt").iterdir())  # the finished run leaves no checkpoint behind
    with pytest.raises(ConfigError, match="float_lr"):
        make_config("svdquant", "reconstructed", reconstruction={"float_lr": -1.0})
    assert rebuilt.quantization["details"]["rounding"] == "adaround"
    assert svdquant_unet.quantization["details"]["rounding"] == "gptq"
    with pytest.raises(ConfigError, match="INT weight format"):
        make_config("svdquant", "reconstructed", weight_format="nvfp4", weight_group_size=16)


def test_svdquant_save_load_export_keeps_branch_smoothing_and_groups(svdquant_unet, tmp_path):
    diffquant.save(svdquant_unet, tmp_path / "q")
    reloaded = diffquant.load(tmp_path / "q")
    name = "down_blocks.1.resnets.0.conv2"  # 32 input channels: groups fit as gcd(288, 64), gcd(32, 64)
    before, after = svdquant_unet.denoiser.get_submodule(name), reloaded.denoiser.get_submodule(name)
    assert isinstance(after, LowRankQuantLayer) and after.rank == before.rank == 8
    smoothed = [n for n, m in svdquant_unet.denoiser.named_modules() if isinstance(m, LowRankQuantLayer)]
    smoothed = [n for n in smoothed if not torch.all(svdquant_unet.denoiser.get_submodule(n).smooth == 1)]
    assert smoothed  # the search chose smoothing somewhere, and the scales survive the round trip
    for layer_name in smoothed:
        original_scales = svdquant_unet.denoiser.get_submodule(layer_name).smooth
        assert torch.equal(reloaded.denoiser.get_submodule(layer_name).smooth, original_scales)
    assert torch.equal(after.lora_down, before.lora_down) and torch.equal(after.lora_up, before.lora_up)
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), "pt") as stored:
        assert stored.get_slice(f"{name}.lora_up").get_dtype() == "F16"  # the branch costs 16 bits on disk
    weight_spec = after.residual.weight_quantizer.spec
    input_spec = after.residual.input_quantizer.spec
    assert (weight_spec.granularity, weight_spec.group_size, weight_spec.format) == ("group", 32, "int4")
    assert (input_spec.granularity, input_spec.group_size, input_spec.dynamic) == ("token_group", 32, True)
    assert torch.equal(_output(svdquant_unet), _output(reloaded))
    exported = export_model(reloaded, "onednn" if torch.backends.mkldnn.is_available() else "fake")
    deployed = exported.denoiser.inner.get_submodule(name)
    assert isinstance(deployed, LowRankQuantLayer)  # the branch stays a real float matmul beside the kernel
    assert torch.allclose(_output(exported), _output(reloaded), atol=1e-5, rtol=1e-5)


def test_nvfp4_weights_and_activations_pack_to_4_bits_and_reload_exactly(trained_unet, calibration, tmp_path):
    from safetensors.torch import load_file

    from diffquant.runtime.storage import TENSORS_FILE

    options = {"weight_format": "nvfp4", "weight_group_size": 16, "abits": None}
    with pytest.raises(ConfigError, match="keep_fp"):  # conv_in has 1 x 3 x 3 weights per row, not a block of 16
        diffquant.quantize(trained_unet, "naive", calibration, progress=False, **options)
    quantized = diffquant.quantize(trained_unet, "naive", calibration, progress=False, keep_fp=("conv_in",), **options)
    layers = dict(quant_layers(quantized.denoiser))
    assert layers["conv_out"].weight_quantizer.spec.format == "nvfp4"
    diffquant.save(quantized, tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / TENSORS_FILE))
    packed = sum(v.numel() for k, v in stored.items() if k.endswith(".weight_codes.packed"))
    assert packed == sum(layer.weight_codes.numel() for layer in layers.values()) // 2
    reloaded = diffquant.load(tmp_path / "q")
    assert torch.equal(_output(quantized), _output(reloaded))


def test_svdquant_presets_hold_the_paper_defaults():
    paper = make_config("svdquant", "paper")
    assert (paper.wbits, paper.abits, paper.weight_group_size, paper.activation_group_size, paper.rank) == (
        4, 4, 64, 64, 32,
    )
    assert paper.gptq and paper.gptq_damping == 0.01 and len(paper.smoothing_alphas) == 19
    assert paper.activation_spec() == QuantSpec("int4", granularity="token_group", group_size=64, dynamic=True)
    nvfp4 = make_config("svdquant", "nvfp4")
    assert nvfp4.weight_spec().format == "nvfp4" and nvfp4.weight_spec().group_size == 16
    assert nvfp4.activation_spec().format == "nvfp4" and nvfp4.activation_spec().group_size == 16
    assert make_config("svdquant", "fast", abits=8).setting == "W4A8"
    rebuilt = make_config("svdquant", "reconstructed-scaled")
    assert rebuilt.reconstruct and rebuilt.rank_fraction == 32 / 1152 and rebuilt.reconstruction.weight_iters == 400
    assert not paper.reconstruct  # the paper rounds with GPTQ
    fine = make_config("svdquant", "reconstructed-fine")
    assert fine.activation_spec().group_size == 16 and not fine.modulation_weight_only and fine.reconstruct
    with pytest.raises(ConfigError, match="alphas"):
        make_config("svdquant", "fast", smoothing_alphas=(1.5,))


def test_svdquant_rank_is_absolute_or_a_fraction_of_the_layer_width():
    paper, scaled = make_config("svdquant", "paper"), make_config("svdquant", "scaled")
    assert branch_rank(paper, 3072, 3072) == 32 and branch_rank(paper, 64, 16) == 16  # capped by the layer
    # the PixArt ratio: 32 of 1152 channels there, 4 of a 128-wide DiT layer, never below 1
    assert branch_rank(scaled, 1152, 1152) == 32 and branch_rank(scaled, 512, 128) == 4
    assert branch_rank(scaled, 8, 8) == 1
    with pytest.raises(ConfigError, match="rank_fraction"):
        make_config("svdquant", rank_fraction=0.0)
    # options of the wrong type fail at configuration, naming the option (not deep inside quantization)
    for bad in ({"unsigned_post_gelu": "yes"}, {"rank_fraction": "half"}, {"rank": True}, {"gptq": 1}):
        with pytest.raises(ConfigError, match=f"option '{next(iter(bad))}' must be"):
            make_config("svdquant", **bad)


def test_svdquant_on_a_dit_keeps_the_official_skip_list_in_16_bits():
    from diffquant.calibration import UniformSteps, record_trajectories
    from diffquant.sampling import SamplerConfig
    from tests.conftest import tiny_dit_model

    model = tiny_dit_model()
    calibration = record_trajectories(model, 4, SamplerConfig("ddim", 4), UniformSteps(2), seed=1, progress=False)
    config = make_config("svdquant", "fast", rank=4, smoothing_alphas=(0.5,), calibration_samples=8, search_samples=4)
    quantized = diffquant.quantize(model, config, calibration, progress=False)
    kept = set(quantized.quantization["details"]["kept_16bit"])
    assert {"pos_embed.proj", "proj_out_1", "proj_out_2"} <= kept
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" in kept
    # adaLN modulation: 4-bit weights, float inputs, no branch (W4A16, as Nunchaku runs it)
    modulation = quantized.quantization["details"]["weight_only_modulation"]
    assert "transformer_blocks.0.norm1.linear" in modulation and not set(modulation) & kept
    adaln = quantized.denoiser.get_submodule("transformer_blocks.0.norm1.linear")
    assert isinstance(adaln, QuantLinear) and adaln.weight_quantizer.spec.bits == 4 and adaln.input_quantizer is None
    lowrank = {n for n, m in quantized.denoiser.named_modules() if isinstance(m, LowRankQuantLayer)}
    assert "transformer_blocks.0.attn1.to_q" in lowrank and "transformer_blocks.1.ff.net.2" in lowrank
    # the feed-forward output projection reads post-GELU values: its 4-bit grid spends no level below zero
    unsigned = set(quantized.quantization["details"]["post_gelu_unsigned_inputs"])
    assert "transformer_blocks.1.ff.net.2" in unsigned and "transformer_blocks.0.attn1.to_q" not in unsigned
    ff_input = quantized.denoiser.get_submodule("transformer_blocks.1.ff.net.2").residual.input_quantizer.spec
    assert not ff_input.symmetric and ff_input.dynamic
    assert not lowrank & kept
