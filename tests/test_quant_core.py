import pytest
import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant import (
    FloatFormat,
    Granularity,
    IntFormat,
    Quantizer,
    QuantSpec,
    fake_quantize_int,
    float_round,
    from_codes,
    group_view,
    pack_codes,
    packed_size,
    params_from_range,
    parse_format,
    step_context,
    to_codes,
    ungroup,
    unpack_codes,
)
from diffquant.quant.observers import LpSearchObserver, Observer, PercentileObserver


@pytest.mark.parametrize(
    "name,max_value", [("e4m3", 448.0), ("e5m2", 57344.0), ("e3m2", 28.0), ("e2m3", 7.5), ("e2m1", 6.0), ("e3m0", 16.0)]
)
def test_named_float_format_maxima(name, max_value):
    assert parse_format(name).max_value == max_value


def test_e2m1_grid_is_exact():
    values = torch.linspace(-7, 7, 2001)
    grid = set(float_round(values, parse_format("e2m1")).abs().tolist())
    assert grid == {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def test_e3m0_grid_is_powers_of_two():
    grid = set(float_round(torch.linspace(0, 20, 5000), parse_format("e3m0")).tolist())
    assert grid == {0.0} | {2.0**k for k in range(-2, 5)}


@pytest.mark.parametrize("name,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_float8_rounding_matches_torch(name, dtype):
    fmt = parse_format(name)
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(20000).uniform_(-20, 15.5, generator=generator))
    values = magnitudes * torch.where(torch.rand(20000, generator=generator) < 0.5, -1.0, 1.0)
    values = values[values.abs() <= fmt.max_value]
    expected = values.to(dtype).float()
    assert torch.equal(float_round(values, fmt), expected)
    # every representable finite value survives a round trip unchanged
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    every = every[torch.isfinite(every)]
    assert torch.equal(float_round(every, fmt), every)


def test_int_format_ranges_and_errors():
    assert (IntFormat(4).qmin, IntFormat(4).qmax) == (-8, 7)
    assert (IntFormat(3, signed=False).qmin, IntFormat(3, signed=False).qmax) == (0, 7)
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="between 1 and 16"):
            IntFormat(bad)
    with pytest.raises(ConfigError, match="Unknown number format"):
        parse_format("int4.5")
    with pytest.raises(ConfigError, match="1-bit signed symmetric"):
        QuantSpec("int1")


def test_exact_integer_grid():
    x = torch.linspace(-1, 1, 101)
    scale, zero = params_from_range(x.min(), x.max(), IntFormat(4), symmetric=True)
    assert scale.item() == pytest.approx(1 / 7)
    q = fake_quantize_int(x, scale, zero, IntFormat(4))
    assert torch.allclose(torch.unique(q / scale), torch.arange(-7, 8, dtype=torch.float32), atol=1e-5)
    scale, zero = params_from_range(torch.tensor(0.0), torch.tensor(3.0), IntFormat(2, signed=False), symmetric=False)
    assert scale.item() == pytest.approx(1.0) and zero.item() == 0.0


def test_affine_grid_keeps_zero_exact():
    scale, zero = params_from_range(torch.tensor(-0.3), torch.tensor(2.1), IntFormat(8, signed=False), symmetric=False)
    assert fake_quantize_int(torch.tensor(0.0), scale, zero, IntFormat(8, signed=False)).item() == 0.0


def test_ste_gradients():
    fmt = IntFormat(4)
    x = torch.tensor([0.26, -0.8, 3.0, -5.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quantize_int(x, scale, torch.tensor(0.0), fmt).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # identity inside [-0.8, 0.7], zero where clipped
    expected_scale_grad = (round(2.6) - 2.6) + (-8 - (-8.0)) + 7 + (-8)  # LSQ: round(x/s) - x/s inside, q at clip
    assert scale.grad.item() == pytest.approx(expected_scale_grad, abs=1e-4)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_packing_round_trip_every_width(bits):
    generator = torch.Generator().manual_seed(bits)
    count = 1001
    codes = torch.randint(0, 2**bits, (count,), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_packing_rejects_out_of_range_and_corrupt():
    with pytest.raises(DiffquantError, match="out of range"):
        pack_codes(torch.tensor([0, 16]), 4)
    with pytest.raises(DiffquantError, match="corrupt"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 100)


@pytest.mark.parametrize("name", ["int8", "uint4", "int2", "e4m3", "e2m1", "e3m2", "binary"])
def test_codes_round_trip_equals_fake_quant(name):
    spec = QuantSpec(name, symmetric=name != "uint4", granularity="per_channel")
    weight = torch.randn(16, 8, 3, 3)
    quantizer = Quantizer(spec)
    quantizer.calibrate_static(weight)
    view = group_view(weight, quantizer.grouping)
    scale, zero = quantizer.current_params(view)
    codes = to_codes(view, scale, zero, quantizer.fmt)
    assert codes.min() >= 0 and codes.max() < 2**spec.bits
    unpacked = unpack_codes(pack_codes(codes, spec.bits), spec.bits, codes.numel()).reshape(codes.shape)
    restored = ungroup(from_codes(unpacked, scale, zero, quantizer.fmt), weight.shape, quantizer.grouping)
    assert torch.allclose(restored, quantizer(weight), atol=1e-6)


@pytest.mark.parametrize(
    "granularity,shape",
    [
        (Granularity("per_tensor"), (4, 6, 3, 3)),
        (Granularity("per_channel", axis=0), (4, 6, 3, 3)),
        (Granularity("per_channel", axis=1), (2, 5, 7)),
        (Granularity("per_token"), (2, 5, 7)),
        (Granularity("per_token"), (2, 6, 3, 3)),
        (Granularity("group", group_size=9), (4, 6, 3, 3)),
    ],
)
def test_group_view_round_trip(granularity, shape):
    x = torch.randn(shape)
    assert torch.equal(ungroup(group_view(x, granularity), x.shape, granularity), x)


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        group_view(torch.randn(4, 10), Granularity("group", group_size=3))


def test_per_channel_scales_follow_channels():
    weight = torch.randn(3, 10) * torch.tensor([[0.01], [1.0], [100.0]])
    quantizer = Quantizer(QuantSpec("int8", granularity="per_channel"))
    quantizer.calibrate_static(weight)
    assert quantizer.scale.shape == (3,)
    assert quantizer.scale[0] < quantizer.scale[1] < quantizer.scale[2]


def test_lp_search_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    data = torch.distributions.Laplace(0.0, 1.0).sample((1, 20000))
    fmt = IntFormat(4)
    minmax, lp = Observer(), LpSearchObserver(fmt, symmetric=True)
    for observer in (minmax, lp):
        observer.update(data)
    errors = []
    for observer in (minmax, lp):
        scale, zero = params_from_range(*observer.range(), fmt, True)
        errors.append((fake_quantize_int(data, scale[:, None], zero[:, None], fmt) - data).pow(2).mean().item())
    assert errors[1] < 0.6 * errors[0], errors


def test_percentile_observer_clips_outliers():
    data = torch.cat([torch.linspace(-1, 1, 10000), torch.tensor([50.0])])[None]
    observer = PercentileObserver(99.9)
    observer.update(data)
    low, high = observer.range()
    assert high.item() < 2.0 and low.item() > -2.0


def test_per_step_bank_is_selected_by_context():
    quantizer = Quantizer(QuantSpec("int8", per_step=True))
    quantizer.start_observing()
    for index, (timestep, magnitude) in enumerate([(900, 10.0), (500, 1.0), (100, 0.1)]):
        with step_context(index, timestep, 3):
            quantizer(torch.linspace(-magnitude, magnitude, 100))
    quantizer.finish_observing()
    assert quantizer.scale.shape == (3, 1)  # (steps, groups)
    x = torch.tensor([0.05, 0.5, 5.0])
    with step_context(2, 100, 3):
        fine = quantizer(x)
    with step_context(0, 900, 3):
        coarse = quantizer(x)
    with step_context(7, 480, 50):  # another sampler: nearest calibrated timestep (500)
        middle = quantizer(x)
    assert fine[0].item() == pytest.approx(0.05, abs=0.001) and fine[2].item() == pytest.approx(0.1)
    assert coarse[0].item() == pytest.approx(10 / 127) and coarse[2].item() == pytest.approx(5.0, abs=0.05)
    assert middle[2].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DiffquantError, match="sampling step"):
        quantizer(x)


def test_learnable_scale_gets_gradient_and_survives_state_dict():
    quantizer = Quantizer(QuantSpec("int4", learnable=True))
    quantizer.start_observing()
    quantizer(torch.randn(1000))
    quantizer.finish_observing()
    # learned in log space so it stays positive (issue 20)
    assert isinstance(quantizer.log_scale, torch.nn.Parameter) and quantizer.scale is None
    quantizer(torch.randn(100)).pow(2).sum().backward()
    assert quantizer.log_scale.grad is not None and quantizer.log_scale.grad.abs() > 0
    clone = Quantizer(QuantSpec("int4", learnable=True))
    clone.load_state_dict(quantizer.state_dict())
    assert torch.equal(clone.step_size(), quantizer.step_size())


def test_dynamic_per_token_needs_no_calibration():
    quantizer = Quantizer(QuantSpec("int8", granularity="per_token", dynamic=True))
    x = torch.randn(2, 5, 16) * torch.logspace(-2, 2, 5)[None, :, None]
    relative = ((quantizer(x) - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert relative < 0.02


def test_float_format_spec():
    spec = QuantSpec("e4m3")
    assert isinstance(spec.number_format, FloatFormat) and spec.bits == 8
    quantizer = Quantizer(spec)
    quantizer.calibrate_static(torch.randn(8, 8))
    assert quantizer.zero_point.abs().sum() == 0
