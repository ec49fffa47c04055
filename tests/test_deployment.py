"""What runs how once an SVDQuant model is exported (docs/DEPLOYMENT.md): the 4-bit residual on the
backend's kernel, the smoothing divide and the low-rank branch as real float ops beside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffquant
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.methods import make_config
from diffquant.modules import LowRankQuantLayer
from diffquant.quant import Quantizer, step_context
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels import DequantizedLayer, PackedWeightLayer
from diffquant.sampling import SamplerConfig
from tests.conftest import tiny_dit_model

BACKEND = "onednn"
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the onednn backend needs oneDNN")
# nvfp4 blocks of 16 do not fit the 4-value patch embedding: SVDQuant's own skip list keeps it in 16 bits,
# so quantize() must not refuse the shape before the method has applied that list
PRESETS = {"paper": {}, "nvfp4": {}}


@pytest.fixture(scope="module")
def calibration():
    return record_trajectories(tiny_dit_model(), 4, SamplerConfig("ddim", 4), UniformSteps(2), seed=1, progress=False)


@pytest.fixture(scope="module", params=list(PRESETS))
def svdquant_dit(request, calibration):
    small = {"rank": 4, "smoothing_alphas": (0.5,), "calibration_samples": 8, "search_samples": 4}
    config = make_config("svdquant", request.param, **small, **PRESETS[request.param])
    return diffquant.quantize(tiny_dit_model(), config, calibration, progress=False)


def _lowrank(model) -> dict[str, LowRankQuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankQuantLayer)}


def _denoise(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((4, *model.info.image_shape), generator=generator)
    labels = torch.randint(0, model.info.num_classes, (4,), generator=generator)
    with torch.no_grad(), step_context(0, 500, 10):
        return model.denoiser(x, torch.full((4,), 500), class_labels=labels).sample


@needs_onednn
@pytest.mark.parametrize("mode", ["packed", "on-the-fly"])
def test_the_kernel_report_says_the_branch_and_smoothing_run_as_float_ops(svdquant_dit, mode):
    exported = export_model(svdquant_dit, BACKEND, weight_only_mode=mode)
    count = len(_lowrank(svdquant_dit.denoiser))
    assert count == svdquant_dit.quantization["details"]["lowrank_layers"] > 0
    # 4-bit activations have no integer kernel on a CPU: the residual computes in float with its input
    # fake-quantized per token group at run time (decoded at load, or from packed codes at every call)
    residual = {"packed": DequantizedLayer.kernel, "on-the-fly": PackedWeightLayer.kernel}[mode]
    kernels = dict(exported.quantization["kernels"])
    assert kernels.pop("lowrank input transform: float32 smoothing divide") == count
    assert kernels.pop("lowrank branch: float32 matmul") == count
    assert kernels.get(f"linear: {residual}", 0) >= count
    # beside them only plain linears: the adaLN modulation layers, weight-only (W4A16, no branch)
    modulation = len(svdquant_dit.quantization["details"]["weight_only_modulation"])
    assert modulation > 0 and all(kind.startswith("linear: ") for kind in kernels)
    assert sum(kernels.values()) == count + modulation


@needs_onednn
def test_the_branch_is_a_float_matmul_on_the_unquantized_input(svdquant_dit):
    exported = export_model(svdquant_dit, BACKEND, weight_only_mode="on-the-fly")
    simulated, deployed = _lowrank(svdquant_dit.denoiser), _lowrank(exported.denoiser.inner)
    assert deployed.keys() == simulated.keys()
    generator = torch.Generator().manual_seed(3)
    for name, layer in deployed.items():
        assert isinstance(layer.residual, PackedWeightLayer), name
        x = torch.randn(6, 5, layer.lora_down.shape[1], generator=generator)
        # the branch keeps the float tensors the SVD gave, not values on a 4-bit grid
        assert layer.lora_down.dtype == layer.lora_up.dtype == torch.float32
        assert torch.equal(layer.lora_down, simulated[name].lora_down)
        assert torch.equal(layer.lora_up, simulated[name].lora_up)
        quantizers = [m for m in layer.modules() if isinstance(m, Quantizer)]
        assert quantizers == [layer.residual.input_quantizer]  # the residual's input is the only one quantized

        with torch.no_grad():
            x_t = x / layer.smooth
            branch_only = layer(x) - layer.residual(x_t)
            down, up = layer.lora_down.double(), layer.lora_up.double()
            on_float_input = x_t.double() @ down.T @ up.T
            on_quantized_input = layer.residual.input_quantizer(x_t).double() @ down.T @ up.T
        assert torch.allclose(branch_only.double(), on_float_input, atol=1e-5, rtol=1e-5), name
        assert not torch.allclose(branch_only.double(), on_quantized_input, atol=1e-5, rtol=1e-5), name
        assert on_float_input.norm() > 0.05 * layer(x).norm()  # the branch carries real signal


@needs_onednn
def test_the_residual_keeps_its_4_bit_codes_packed_and_matches_the_simulation(svdquant_dit):
    exported = export_model(svdquant_dit, BACKEND, weight_only_mode="on-the-fly")
    for name, layer in _lowrank(exported.denoiser.inner).items():
        out_features, in_features = layer.lora_up.shape[0], layer.lora_down.shape[1]
        assert layer.residual.bits == 4
        assert layer.residual.packed.numel() * 2 == out_features * in_features, name  # two codes per byte
    torch.testing.assert_close(_denoise(exported), _denoise(svdquant_dit), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_rotated_svdquant_layer_reports_its_hadamard_matmul(calibration):
    config = make_config(
        "svdquant", "fast", rank=2, rotate=True, smoothing_alphas=(0.5,), calibration_samples=8, search_samples=4
    )
    quantized = diffquant.quantize(tiny_dit_model(), config, calibration, progress=False)
    # on-the-fly decoding keeps the W4A16 modulation layers exact (the packed int4 kernel computes in bf16)
    exported = export_model(quantized, BACKEND, weight_only_mode="on-the-fly")
    count = len(_lowrank(quantized.denoiser))
    kernels = exported.quantization["kernels"]
    assert kernels["lowrank input transform: float32 smoothing divide + float32 Hadamard matmul"] == count
    torch.testing.assert_close(_denoise(exported), _denoise(quantized), atol=1e-5, rtol=1e-5)


def test_a_rank_zero_layer_reports_no_branch():
    layer = LowRankQuantLayer(torch.nn.Linear(8, 4), None, None, rank=0)
    assert layer.float_paths() == {"input transform": "float32 smoothing divide"}
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, layer.residual.weight, layer.residual.bias))
