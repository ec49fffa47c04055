"""The inductor backend: our grids in PT2E's reference form, lowered by inductor to oneDNN int8."""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch.profiler import profile
from typer.testing import CliRunner

import diffquant
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.cli import app
from diffquant.errors import DiffquantError
from diffquant.modules import quant_layers
from diffquant.quant import step_context
from diffquant.runtime.backends import get_backend
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_inductor import DecomposedGELU, InductorInt8Conv2d, InductorInt8Linear
from diffquant.runtime.kernels_int4 import bf16_matmul_supported
from diffquant.sampling import SamplerConfig
from tests.conftest import affine_8bit_layer, tiny_dit_model


def _denoise(model, batch, step=None):
    """The denoiser's output on `batch`, at `step`'s sampling step (the batch's own by default)."""
    step = step or batch
    with torch.no_grad(), step_context(step.step_index, step.timestep, step.num_steps):
        return model.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample


def _onednn_calls(model, batch) -> dict[str, int]:
    """How many oneDNN int8 kernels one compiled call runs, by name."""
    with profile() as trace:
        _denoise(model, batch)
    counts = {event.key: event.count for event in trace.key_averages()}
    convs = counts.get("onednn::qconv_pointwise", 0) + counts.get("onednn::qconv2d_pointwise", 0)  # inductor's, ours
    return {"onednn::qlinear_pointwise": counts.get("onednn::qlinear_pointwise", 0), "convolutions": convs}


@pytest.fixture(scope="module")
def dit_calibration():
    model = tiny_dit_model()
    return model, record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)


BF16 = pytest.mark.skipif(not bf16_matmul_supported(), reason="bfloat16 compute needs AVX512-BF16 or AMX")


@pytest.mark.parametrize(
    ("per_step", "compute_dtype"),
    [(False, "float32"), (True, "float32"), pytest.param(False, "bfloat16", marks=BF16)],
)
def test_every_int8_layer_is_lowered_to_onednn_and_agrees(dit_calibration, per_step, compute_dtype):
    model, calibration = dit_calibration
    quantized = diffquant.quantize(
        model, "naive", calibration, progress=False, wbits=8, abits=8, activation_per_step=per_step
    )
    deployed = export_model(quantized, "inductor", compile=True, compute_dtype=compute_dtype)
    linears = sum(layer.kind == "linear" for _, layer in quant_layers(quantized.denoiser))
    convs = sum(layer.kind == "conv2d" for _, layer in quant_layers(quantized.denoiser))
    # inductor matches convolutions only with a fixed input grid: per-step ones keep our oneDNN operator
    conv_kernel = "onednn::qconv2d_pointwise" + ("" if per_step else " (inductor-lowered)")
    assert deployed.quantization["kernels"] == {
        "linear: onednn::qlinear_pointwise (inductor-lowered)": linears,
        f"conv2d: {conv_kernel}": convs,
    }
    first, last = (next(b for b in calibration.batches(8) if b.step_index == calibration.steps[i]) for i in (0, 3))
    _denoise(deployed, first)  # compiles
    # every int8 layer became a oneDNN kernel: none was left as the float emulation of its reference form
    assert _onednn_calls(deployed, first) == {
        "onednn::qlinear_pointwise": linears,
        "convolutions": convs,
    }
    tolerance = 0.02 if compute_dtype == "float32" else 0.08
    for batch in (first, last):
        reference, candidate = _denoise(quantized, batch), _denoise(deployed, batch)
        # bfloat16 compute: bfloat16's rounding (about 1e-2) on top of the float32 simulation
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < tolerance
    if per_step:  # the clock goes into the frozen graph as an input: the last step's grid, not the first's
        wrong_grid = _denoise(quantized, last, step=first)
        reference, candidate = _denoise(quantized, last), _denoise(deployed, last)
        assert (candidate - reference).abs().max() < 0.5 * (wrong_grid - reference).abs().max()


def test_reference_form_equals_the_simulation_layer_by_layer(dit_calibration):
    # uncompiled, each layer is the float emulation of its int8 GEMM: equal to the simulated layer
    model, calibration = dit_calibration
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8)
    deployed = export_model(quantized, "inductor")
    generator = torch.Generator().manual_seed(0)
    for name, layer in quant_layers(quantized.denoiser):
        real = deployed.denoiser.inner.get_submodule(name)
        shape = (4, layer.in_channels, 8, 8) if layer.kind == "conv2d" else (4, 3, layer.in_features)
        x = torch.randn(shape, generator=generator) * 2
        with torch.no_grad():
            reference, candidate = layer(x), real(x)
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < 1e-5, name
    # the GELU projection is written op by op for inductor's GELU post-op pattern; the second feed-forward
    # linear takes PT2E's quantize op, which inductor folds into the first GEMM as uint8 output
    net = deployed.denoiser.inner.transformer_blocks[0].ff.net
    assert isinstance(net[0], DecomposedGELU) and isinstance(net[2], InductorInt8Linear) and net[2].requantized
    y = torch.linspace(-8, 8, 2001)
    for approximate in ("tanh", "none"):
        gelu = DecomposedGELU(torch.nn.Identity(), approximate)
        assert (gelu(y) - torch.nn.functional.gelu(y, approximate=approximate)).abs().max().item() < 1e-6


def test_inductor_backend_is_registered_with_freezing():
    backend = get_backend("inductor")
    assert backend.freezes and not get_backend("onednn").freezes


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_affine_8bit_weights_keep_their_correction_when_lowered(kind):
    layer, x = affine_8bit_layer(kind)
    real = InductorInt8Linear(layer) if kind == "linear" else InductorInt8Conv2d(layer)
    compiled = torch.compile(real)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        reference, emulated = layer(x), real(x)
        compiled(x)
        with profile() as trace:
            lowered = compiled(x)
    assert any(event.key.startswith("onednn::q") for event in trace.key_averages())  # a oneDNN int8 kernel ran
    for candidate in (emulated, lowered):
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_export_command_needs_compile_and_checks_the_lowered_kernels(dit_calibration, tmp_path):
    model, calibration = dit_calibration
    diffquant.save(diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8), tmp_path / "q")
    command = ["export", "--model", str(tmp_path / "q"), "--backend", "inductor", "--out", str(tmp_path / "e")]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "only compiled" in refused.output and "--compile" in refused.output
    assert not (tmp_path / "e").exists()
    result = CliRunner().invoke(app, [*command, "--compile"])
    assert result.exit_code == 0, result.output
    assert "onednn::qlinear_pointwise (inductor-lowered)" in result.output
    loaded = diffquant.load(tmp_path / "e")
    assert loaded.quantization["backend"] == "inductor" and loaded.quantization["compiled"]
    batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[0])
    _denoise(loaded, batch)
    assert _onednn_calls(loaded, batch)["onednn::qlinear_pointwise"] > 0
    report = tmp_path / "e" / "export.json"  # a hand-edited file without compile: one error naming it
    report.write_text(report.read_text().replace('"compile": true', '"compile": false'))
    with pytest.raises(DiffquantError, match="export.json names the inductor backend without compile"):
        diffquant.load(tmp_path / "e")
