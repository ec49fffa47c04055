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
