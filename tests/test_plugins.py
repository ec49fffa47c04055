"""Things that plug in from user code: a layer kind, a backend and a method, each registered once."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffquant.engines.reconstruction import output_layers
from diffquant.engines.units import discover_units
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import METHODS, MethodConfig, get_method, make_config, method_for_config, register_method
from diffquant.modules import KINDS, LayerKind, LayerPolicy, apply_plans, quant_layers, register_kind, resolve_policy
from diffquant.modules.layers import QuantLinear
from diffquant.modules.lowrank import LowRankQuantLayer
from diffquant.modules.surgery import export_plans
from diffquant.quant import QuantSpec
from diffquant.runtime.backends import BACKEND_CLASSES, Backend, register_backend
from diffquant.runtime.diffusers_format import WEIGHTS_FILE, export_diffusers
from diffquant.runtime.export import check_backend, export_model
from diffquant.runtime.storage import QUANTIZATION_FILE, load_quantized, save_quantized
from tests.conftest import tiny_unet_model

TOY_LAYER = "time_embedding.linear_1"  # a linear outside every reconstruction block of the tiny UNet


class GainQuantLinear(LayerKind, nn.Module):
    """A toy layer kind: a quantized linear (`inner`) whose output is scaled by a fixed gain."""

    kind = "test-gain-linear"
    float_type = nn.Linear

    def __init__(self, original: nn.Linear, weight_spec, input_spec, gain: float = 1.0) -> None:
        super().__init__()
        self.inner = QuantLinear(original, weight_spec, input_spec)
        self.register_buffer("gain", torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.inner(x)

    def plan_options(self) -> dict:
        return {"gain": float(self.gain)}

    def quantized_parts(self) -> dict:
        return {"inner": self.inner}

    def joined_weight(self) -> torch.Tensor:
        return (self.gain * self.inner.dequantized_weight()).detach()


@pytest.fixture
def gain_kind():
    register_kind(GainQuantLinear)
    yield GainQuantLinear
    KINDS.pop(GainQuantLinear.kind)


def _toy_model(gain: float = 0.5):
    """The tiny UNet, weight-only int8, with the toy kind on one linear; frozen, as quantize() leaves it."""
    model = tiny_unet_model()
    layers, attention = resolve_policy(model.denoiser, LayerPolicy(activation=None))
    layers[TOY_LAYER] = replace(layers[TOY_LAYER], kind=GainQuantLinear.kind, options={"gain": gain})
    apply_plans(model.denoiser, layers, attention)
    for _, layer in quant_layers(model.denoiser):
        layer.calibrate_weight()
        layer.freeze()
    model.quantization = {"method": "toy", "setting": "W8"}
    return model


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([10, 500])


def _run(denoiser) -> torch.Tensor:
    sample, timestep = _inputs()
    with torch.no_grad():
        return denoiser(sample=sample, timestep=timestep).sample


def test_a_kind_from_user_code_is_built_from_its_plan_saved_and_loaded_back(gain_kind, tmp_path):
    model = _toy_model(gain=0.5)
    toy = model.denoiser.get_submodule(TOY_LAYER)
    assert type(toy) is GainQuantLinear and toy.inner.frozen
    entry = export_plans(model.denoiser)["layers"][TOY_LAYER]
    assert entry["kind"] == "test-gain-linear" and entry["options"] == {"gain": 0.5}
    assert entry["weight"] == QuantSpec("int8", granularity="per_channel").to_json()
    plain = export_plans(model.denoiser)["layers"]["time_embedding.linear_2"]
    assert set(plain) == {"weight", "input", "split"}  # built-in kinds keep format 1's entries

    save_quantized(model, tmp_path / "toy")
    loaded = load_quantized(tmp_path / "toy")
    assert type(loaded.denoiser.get_submodule(TOY_LAYER)) is GainQuantLinear
    assert float(loaded.denoiser.get_submodule(TOY_LAYER).gain) == 0.5
    assert torch.equal(_run(loaded.denoiser), _run(model.denoiser))


def test_a_saved_kind_that_is_not_registered_is_a_clear_error(gain_kind, tmp_path):
    save_quantized(_toy_model(), tmp_path / "toy")
    KINDS.pop(GainQuantLinear.kind)
    try:
        with pytest.raises(DiffquantError, match="layer kind 'test-gain-linear', which is not registered here"):
            load_quantized(tmp_path / "toy")
    finally:
        register_kind(GainQuantLinear)
    record = json.loads((tmp_path / "toy" / QUANTIZATION_FILE).read_text())
    assert record["structure"]["layers"][TOY_LAYER]["kind"] == "test-gain-linear"


def test_a_kind_is_one_reconstruction_unit_of_its_parts(gain_kind):
    model = _toy_model()
    units = {unit.name: unit for unit in discover_units(model.denoiser, lambda: _run(model.denoiser))}
    assert units[TOY_LAYER].layers == [f"{TOY_LAYER}.inner"]
    assert f"{TOY_LAYER}.inner" not in units
    assert output_layers(model.denoiser, units[TOY_LAYER]) == [TOY_LAYER]  # full precision has the whole linear


def test_formats_without_kinds_get_the_kinds_joined_weight(gain_kind, tmp_path):
    model = _toy_model(gain=0.5)
    toy = model.denoiser.get_submodule(TOY_LAYER)
    export_diffusers(model, tmp_path / "quanto")
    tensors = load_file(str(tmp_path / "quanto" / WEIGHTS_FILE))
    assert torch.equal(tensors[f"{TOY_LAYER}.weight"], 0.5 * toy.inner.dequantized_weight())
    assert torch.equal(tensors[f"{TOY_LAYER}.bias"], toy.inner.bias)


def test_registering_a_kind_name_twice_is_a_clear_error(gain_kind):
    with pytest.raises(DiffquantError, match="layer kind named 'test-gain-linear' is already registered"):
        register_kind(GainQuantLinear)

    class AnotherLinear(GainQuantLinear):
        kind = "linear"

    with pytest.raises(DiffquantError, match="layer kind named 'linear' is already registered"):
        register_kind(AnotherLinear)


def test_a_plan_asking_for_an_unregistered_kind_is_a_clear_error():
    model = tiny_unet_model()
    layers, attention = resolve_policy(model.denoiser, LayerPolicy(activation=None))
    layers = {TOY_LAYER: replace(layers[TOY_LAYER], kind="no-such-kind")}
    with pytest.raises(ConfigError, match="layer kind 'no-such-kind', which is not registered"):
        apply_plans(model.denoiser, layers, {})


# --- backends -----------------------------------------------------------------------------------------
class ToyKernel(nn.Module):
    """Runs the simulated layer, under its own kernel name."""

    kernel = "toy kernel"

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class LinearsOnlyBackend(Backend):
    name = "test-linears-only"

    def supports(self, layer) -> bool:
        return layer.kind == "linear"

    def convert(self, layer, weight_only_mode: str = "packed") -> nn.Module:
        return ToyKernel(layer)


@pytest.fixture
def linears_only():
    register_backend(LinearsOnlyBackend)
    yield LinearsOnlyBackend
    BACKEND_CLASSES.pop(LinearsOnlyBackend.name)


def test_a_backend_from_user_code_converts_the_layers_it_supports_and_leaves_the_rest(gain_kind, linears_only):
    model = _toy_model()
    deployed = export_model(model, "test-linears-only")
    layers = dict(quant_layers(model.denoiser))
    linears = [name for name, layer in layers.items() if layer.kind == "linear"]
    convs = [name for name, layer in layers.items() if layer.kind == "conv2d"]
    assert linears and convs and f"{TOY_LAYER}.inner" in linears  # the toy kind's part is a plain linear
    assert deployed.quantization["kernels"] == {
        "conv2d: fake-quant simulation": len(convs),
        "linear: toy kernel": len(linears),
    }
    inner = deployed.denoiser.inner
    assert all(isinstance(inner.get_submodule(name), ToyKernel) for name in linears)
    assert all(type(inner.get_submodule(name)) is type(layers[name]) for name in convs)
    assert torch.equal(_run(deployed.denoiser), _run(model.denoiser))


def test_registering_a_backend_name_twice_is_a_clear_error(linears_only):
    with pytest.raises(DiffquantError, match="backend named 'test-linears-only' is already registered"):
        register_backend(LinearsOnlyBackend)

    class AnotherFake(Backend):
        name = "fake"

    with pytest.raises(DiffquantError, match="backend named 'fake' is already registered"):
        register_backend(AnotherFake)


def test_an_unknown_backend_name_is_a_clear_error(gain_kind):
    listed = r"Unknown backend 'tpu'\. Choose one of: fake, onednn, inductor, cuda, openvino\."
    with pytest.raises(DiffquantError, match=listed):
        check_backend("tpu")
    with pytest.raises(DiffquantError, match="Unknown backend 'tpu'"):
        export_model(_toy_model(), "tpu")


# --- methods ------------------------------------------------------------------------------------------
@dataclass
class ToyMethodConfig(MethodConfig):
    name = "test-toy-method"
    PRESETS = {"fast": {"wbits": 6}}


def _toy_apply(denoiser, calibration, config, progress=True) -> dict:
    return {"toy": config.wbits}


@pytest.fixture
def toy_method():
    register_method(ToyMethodConfig, summary="a toy method for the registry tests")(_toy_apply)
    yield
    METHODS.pop(ToyMethodConfig.name)


def test_a_method_registered_against_its_config_is_found_by_make_config(toy_method):
    config = make_config("test-toy-method", wbits=4)
    assert type(config) is ToyMethodConfig and config.wbits == 4
    assert make_config("test-toy-method", "fast").wbits == 6
    entry = get_method("test-toy-method")
    assert method_for_config(config) is entry and entry.apply is _toy_apply
    assert entry.summary == "a toy method for the registry tests"
    assert list(METHODS)[:6] == ["naive", "ptq4dm", "qdiffusion", "tfmq", "edadm", "svdquant"]


def test_registering_a_method_name_twice_is_a_clear_error(toy_method):
    with pytest.raises(DiffquantError, match="method named 'test-toy-method' is already registered"):
        register_method(ToyMethodConfig)(_toy_apply)
    with pytest.raises(DiffquantError, match="method named 'naive' is already registered"):
        register_method(ToyMethodConfig, name="naive")(_toy_apply)


@pytest.mark.parametrize("rotate", [False, True])
def test_the_lowrank_kind_joins_its_weight_back_to_the_float_layout(rotate):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = LowRankQuantLayer(linear, None, None, rank=2, rotate=rotate)
    layer.decompose(linear.weight, smooth=torch.rand(16) + 0.5)
    assert torch.allclose(layer.joined_weight(), linear.weight, atol=1e-5)
    assert layer.joined_bias() is not None and torch.equal(layer.joined_bias(), linear.bias)
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.joined_weight(), linear.bias), atol=1e-5)
