"""Weight-only <= 4-bit layers that keep their weights packed: nibble decode, bf16 compute, torch's int4 GEMM."""

import pytest
import torch
from torch import nn

import diffquant
from diffquant.modules import QuantConv2d, QuantLinear, quant_layers
from diffquant.quant import QuantSpec
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels import DequantizedLayer
from diffquant.runtime.kernels_int4 import (
    Int4PackMMLinear,
    PackedInt4Layer,
    int4pack_group_size,
    pack_nibbles,
    unpack_nibbles,
)
from tests.conftest import tiny_dit_model


def _frozen(layer_class, module, spec: QuantSpec):
    layer = layer_class(module, spec, None)
    layer.calibrate_weight()
    layer.freeze()
    return layer


def _relative(candidate, reference) -> float:
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("count", [1, 6, 7, 64])
def test_nibbles_round_trip(count):
    codes = torch.randint(0, 16, (5, count))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (count + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, count).long(), codes)


SPECS = [
    QuantSpec("int4", granularity="per_channel", symmetric=True),
    QuantSpec("uint4", granularity="per_channel", symmetric=False),
    QuantSpec("int4", granularity="group", group_size=32, symmetric=False),
    QuantSpec("int3", granularity="per_tensor", symmetric=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_packed_layer_decodes_the_simulated_weight_exactly(spec):
    torch.manual_seed(0)
    linear = _frozen(QuantLinear, nn.Linear(64, 48), spec)
    conv = _frozen(
        QuantConv2d, nn.Conv2d(8, 16, 3, padding=1), spec.replace(group_size=24) if spec.group_size else spec
    )
    for layer, x in ((linear, torch.randn(3, 5, 64)), (conv, torch.randn(2, 8, 6, 6))):
        fp32 = PackedInt4Layer(layer, torch.float32)
        assert torch.equal(fp32.weight(), layer.dequantized_weight())
        assert fp32.packed.numel() * 8 <= layer.weight_codes.numel() * 4 + 8 * layer._frozen_shape[0]
        with torch.no_grad():
            reference = layer(x)
            assert _relative(fp32(x), reference) < 1e-5
            # bf16 activations and weights, fp32 accumulation: within bf16 rounding of the simulation
            assert _relative(PackedInt4Layer(layer, torch.bfloat16)(x), reference) < 2e-2


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.describe())
def test_int4pack_matmul_equals_dequantize_then_matmul(spec):
    torch.manual_seed(1)
    layer = _frozen(QuantLinear, nn.Linear(128, 64), spec)
    assert int4pack_group_size(layer) == (32 if spec.grouping.kind == "group" else 128)
    real = Int4PackMMLinear(layer, torch.float32)
    # the kernel's (q - 8) * s + z' table is our s * (q + qmin - z): decode it back through the kernel
    identity = torch.eye(128)
    decoded = torch.ops.aten._weight_int4pack_mm_for_cpu(identity, real.packed, real.group_size, real.scale_and_zeros)
    assert torch.allclose(decoded.t(), layer.dequantized_weight(), rtol=0, atol=1e-6)
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = x @ layer.dequantized_weight().t() + layer.bias
        assert _relative(real(x), expected) < 1e-5
        assert _relative(Int4PackMMLinear(layer, torch.bfloat16)(x), expected) < 2e-2


def test_int4pack_rejects_shapes_its_kernel_cannot_take():
    odd = _frozen(QuantLinear, nn.Linear(100, 64), SPECS[0])  # no kernel group size divides 100
    narrow = _frozen(QuantLinear, nn.Linear(64, 8), SPECS[0])  # N must be a multiple of 16
    assert int4pack_group_size(odd) is None and int4pack_group_size(narrow) is None


def test_weight_only_w4_model_deploys_packed_by_default_with_small_resident_weights():
    model = tiny_dit_model()
    quantized = diffquant.quantize(model, "naive", None, progress=False, wbits=4, abits=None)
    deployed = export_model(quantized, "onednn")
    inner = deployed.denoiser.inner
    layers = dict(quant_layers(quantized.denoiser))
    assert all(isinstance(inner.get_submodule(name), PackedInt4Layer) for name in layers)
    assert deployed.quantization["weight_only_mode"] == "packed"
    packed_bytes = sum(inner.get_submodule(n).packed.numel() for n in layers)
    fp32_bytes = sum(4 * layer.weight_codes.numel() for layer in layers.values())
    assert packed_bytes <= fp32_bytes / 6
    at_load = export_model(quantized, "onednn", weight_only_mode="at-load")
    assert all(isinstance(at_load.denoiser.inner.get_submodule(name), DequantizedLayer) for name in layers)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        reference = quantized.denoiser(x, t, class_labels=labels).sample
        assert torch.equal(at_load.denoiser(x, t, class_labels=labels).sample, reference)
        assert _relative(deployed.denoiser(x, t, class_labels=labels).sample, reference) < 3e-2
    kernel = export_model(quantized, "onednn", weight_only_mode="int4-kernel").quantization["kernels"]
    assert any("_weight_int4pack_mm_for_cpu" in name for name in kernel)
