"""Real-kernel export: oneDNN int8 on CPU, the CUDA kernels' math (checked on CPU), packed weights."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import diffquant
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.cli import app
from diffquant.errors import DiffquantError
from diffquant.modules import QuantConv2d, QuantLinear, quant_layers
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.quant import QuantSpec, step_context
from diffquant.runtime.export import check_backend, export_model
from diffquant.runtime.kernels import (
    DequantizedLayer,
    FusedGELU,
    IntMMLinear,
    OneDNNInt8Conv2d,
    OneDNNInt8Linear,
    PackedWeightLayer,
    ScaledMMFloat8Linear,
    SigmoidFormGELU,
    gelu_tanh,
    int8_weight,
    weight_supported,
)
from diffquant.sampling import SamplerConfig, sample
from tests.conftest import tiny_dit_model

TOLERANCE = 1e-5  # per-layer: integer accumulation vs float simulation differ only by float rounding


def outputs(model, calibration, step=0):
    batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[step])
    with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
        return model.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample


@pytest.fixture(scope="module")
def w8a8(trained_unet, calibration):
    return diffquant.quantize(trained_unet, "naive", calibration, progress=False, wbits=8, abits=8)


def test_every_layer_agrees_with_the_simulation(w8a8):
    deployed = export_model(w8a8, "onednn")
    kernels = deployed.quantization["kernels"]
    assert kernels == {"conv2d: onednn::qconv2d_pointwise": 25, "linear: onednn::qlinear_pointwise": 26}
    generator = torch.Generator().manual_seed(0)
    for name, layer in quant_layers(w8a8.denoiser):
        real = deployed.denoiser.inner.get_submodule(name)
        assert isinstance(real, (OneDNNInt8Conv2d, OneDNNInt8Linear))
        shape = (4, layer.in_channels, 6, 6) if layer.kind == "conv2d" else (4, 3, layer.in_features)
        x = torch.randn(shape, generator=generator) * 2
        with torch.no_grad():
            reference, candidate = layer(x), real(x)
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < TOLERANCE, name


@pytest.mark.slow
def test_whole_model_agreement_eager_and_compiled(trained_unet, w8a8, calibration):
    reference = outputs(w8a8, calibration)
    quantization_error = (reference - outputs(trained_unet, calibration)).pow(2).mean()
    for compiled in (False, True):
        deployed = export_model(w8a8, "onednn", compile=compiled)
        candidate = outputs(deployed, calibration)
        # float rounding can flip a code at a rounding boundary; the deployed model stays far closer
        # to the simulation than the simulation is to full precision
        assert (candidate - reference).pow(2).mean() < 0.25 * quantization_error
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < 0.02


@pytest.mark.slow
def test_per_step_parameters_are_selected_after_export(trained_unet, calibration):
    quantized = diffquant.quantize(
        trained_unet, "naive", calibration, progress=False, wbits=8, abits=6, activation_per_step=True
    )
    deployed = export_model(quantized, "onednn", compile=True)
    layer = dict(quant_layers(quantized.denoiser))["up_blocks.1.resnets.0.conv1"]
    real = deployed.denoiser.inner.get_submodule("up_blocks.1.resnets.0.conv1")
    x = torch.randn(2, layer.in_channels, 8, 8) * 3
    for index, timestep in enumerate(layer.input_quantizer.bank_timesteps.tolist()):
        deployed.denoiser.clock.set(timestep)
        with torch.no_grad(), step_context(index, timestep, 10):
            assert ((real(x) - layer(x)).abs().max() / layer(x).abs().max()).item() < TOLERANCE
            scale, _ = real.input.params()
            assert scale.item() == layer.input_quantizer.scale[index].item()
    for step in (0, len(calibration.steps) - 1):  # and through the compiled whole model
        reference, candidate = outputs(quantized, calibration, step), outputs(deployed, calibration, step)
        quantization_error = (reference - outputs(trained_unet, calibration, step)).pow(2).mean()
        assert (candidate - reference).pow(2).mean() < 0.25 * quantization_error
    images = sample(deployed, 2, SamplerConfig("ddim", 10), seed=0, progress=False).images
    assert torch.isfinite(images).all()


def test_unavailable_backend_is_a_clear_error(w8a8):
    if not torch.cuda.is_available():
        with pytest.raises(DiffquantError, match="cuda backend needs a CUDA GPU"):
            export_model(w8a8, "cuda")
    with pytest.raises(DiffquantError, match="Unknown backend 'tpu'"):
        check_backend("tpu")


def test_weight_only_layers_restore_packed_weights_exactly(trained_unet, calibration):
    for bits in (1, 2, 4, 8):
        fmt = "int1" if bits == 1 else None
        options = {"weight_format": "uint1"} if fmt else {}
        quantized = diffquant.quantize(
            trained_unet, "naive", calibration, progress=False, wbits=bits, abits=None, **options
        )
        deployed = export_model(quantized, "onednn", weight_only_mode="on-the-fly")
        for name, layer in quant_layers(quantized.denoiser):
            real = deployed.denoiser.inner.get_submodule(name)
            assert isinstance(real, PackedWeightLayer)
            assert torch.equal(real.weight(), layer.dequantized_weight())
            assert real.packed.numel() == (layer.weight_codes.numel() * bits + 7) // 8
        at_load = export_model(quantized, "onednn", weight_only_mode="at-load")
        assert all(
            isinstance(at_load.denoiser.inner.get_submodule(n), DequantizedLayer)
            for n, _ in quant_layers(quantized.denoiser)
        )
        assert torch.equal(outputs(at_load, calibration), outputs(quantized, calibration))


def _calibrated_linear(
    weight_format: str, input_format: str, symmetric: bool, weight_symmetric: bool = True
) -> QuantLinear:
    linear = nn.Linear(16, 24)
    weight_spec = QuantSpec(weight_format, granularity="per_channel", symmetric=weight_symmetric)
    layer = QuantLinear(linear, weight_spec, QuantSpec(input_format, symmetric=symmetric))
    layer.calibrate_weight()
    layer.input_quantizer.start_observing()
    layer(torch.randn(64, 16) * 3 + 1)
    layer.input_quantizer.finish_observing()
    layer.freeze()
    return layer


@pytest.mark.parametrize("input_format,symmetric", [("uint8", False), ("int8", True), ("uint4", False)])
def test_int_mm_linear_matches_simulation(input_format, symmetric):
    layer = _calibrated_linear("int8", input_format, symmetric)
    real = IntMMLinear(layer)
    x = torch.randn(32, 16) * 3 + 1
    with torch.no_grad():
        assert ((real(x) - layer(x)).abs().max() / layer(x).abs().max()).item() < TOLERANCE


def test_scaled_mm_float8_linear_matches_simulation():
    layer = _calibrated_linear("e4m3", "e4m3", True)
    real = ScaledMMFloat8Linear(layer)
    x = torch.randn(32, 16) * 3 + 1
    with torch.no_grad():
        assert ((real(x) - layer(x)).abs().max() / layer(x).abs().max()).item() < 1e-4


def test_export_command_writes_a_directory_that_loads_on_its_backend(w8a8, tmp_path):
    diffquant.save(w8a8, tmp_path / "q")
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path / "q"), "--backend", "onednn", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output
    assert "onednn::qconv2d_pointwise" in result.output and "max relative error" in result.output
    loaded = diffquant.load(tmp_path / "e")
    assert loaded.quantization["backend"] == "onednn"
    assert isinstance(loaded.denoiser.inner.get_submodule("conv_in"), OneDNNInt8Conv2d)


def test_affine_low_bit_weights_run_in_int8_with_the_zero_point_folded_in():
    # Q-Diffusion-style asymmetric 4-bit weights: w = s * (q - z) is the int8 weight q - z
    layer = _calibrated_linear("uint4", "uint8", False, weight_symmetric=False)
    assert bool((layer.weight_quantizer.zero_point != 0).any()) and weight_supported(layer)
    real, mm = OneDNNInt8Linear(layer), IntMMLinear(layer)
    x = torch.randn(32, 16) * 3 + 1
    with torch.no_grad():
        reference = layer(x)
        for candidate in (real(x), mm(x)):
            assert ((candidate - reference).abs().max() / reference.abs().max()).item() < TOLERANCE
    # affine 8-bit weights (Q-Diffusion at W8): q - z leaves int8 (z = 200: -200..55), so each channel is
    # shifted into int8 and the output subtracts shift * sum(input) - still exact
    wide = _calibrated_linear("uint8", "uint8", False, weight_symmetric=False)
    wide.weight_quantizer.zero_point[0] = 200.0
    assert weight_supported(wide) and int8_weight(wide).input_sum_weight is not None
    with torch.no_grad():
        reference = wide(x)
        for candidate in (OneDNNInt8Linear(wide)(x), IntMMLinear(wide)(x)):
            assert ((candidate - reference).abs().max() / reference.abs().max()).item() < TOLERANCE


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_affine_8bit_conv_weights_run_in_int8_with_the_window_sum_correction(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation)
    layer = QuantConv2d(
        conv, QuantSpec("uint8", granularity="per_channel", symmetric=False), QuantSpec("uint8", symmetric=False)
    )
    layer.calibrate_weight()
    x = torch.randn(4, 6, 9, 9) * 2 + 0.5
    layer.input_quantizer.start_observing()
    layer(x)
    layer.input_quantizer.finish_observing()
    layer.freeze()
    layer.weight_quantizer.zero_point[::2] = 190.0  # out of int8 once folded in: needs the correction
    assert weight_supported(layer) and int8_weight(layer).input_sum_weight is not None
    with torch.no_grad():
        reference, candidate = layer(x), OneDNNInt8Conv2d(layer)(x)
    assert ((candidate - reference).abs().max() / reference.abs().max()).item() < TOLERANCE


@pytest.mark.parametrize(("abits", "per_step", "chained"), [(8, False, True), (6, False, False), (8, True, True)])
def test_transformer_feedforward_chains_uint8_codes_and_agrees(abits, per_step, chained):
    # GELU projection -> linear: the first int8 GEMM writes the second's uint8 codes itself when the
    # second's input grid is a full 8-bit one (per-step too: the step's row is picked in the graph);
    # narrower grids keep the float hand-off
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    quantized = diffquant.quantize(
        model, "naive", calibration, progress=False, wbits=8, abits=abits, activation_per_step=per_step
    )
    deployed = export_model(quantized, "onednn")
    kernels = deployed.quantization["kernels"]
    assert kernels.get("linear: onednn::qlinear_pointwise (GELU fused, u8 out)", 0) == (2 if chained else 0)
    assert sum(kernels.values()) == len(list(quant_layers(quantized.denoiser)))
    for index in (0, 3):
        batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[index])
        with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
            reference = quantized.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
            candidate = deployed.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
            # one graph for torch.compile: a break (e.g. a per-step row read back to Python) costs ~40 %
            explained = torch._dynamo.explain(deployed.denoiser.inner)(
                batch.sample, batch.timesteps, **batch.conditioning
            )
        assert explained.graph_break_count == 0, explained.break_reasons
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < 0.02
    if chained:  # the GEMM's own requantization equals quantizing its float output on the consumer's grid
        net = deployed.denoiser.inner.transformer_blocks[0].ff.net
        producer, consumer = net[0].proj, net[2]
        x = torch.randn(64, 32) * 2  # the tiny DiT's width: 2 heads x 16
        with torch.no_grad():
            codes = net[0](x)
            grid = producer.output_grid
            object.__setattr__(producer, "output_grid", None)
            expected = consumer.input(net[0](x))[0]
            object.__setattr__(producer, "output_grid", grid)
        assert codes.dtype == torch.uint8
        difference = (codes.int() - expected.int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


def test_tanh_gelu_in_sigmoid_form_equals_torch():
    x = torch.linspace(-12, 12, 4001)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    assert (gelu_tanh(x) - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("preset", ["fast", "deploy"])
def test_affine_8bit_feedforward_keeps_its_correction_before_the_gelu(preset):
    # Q-Diffusion's asymmetric 8-bit weights need the weight-shift correction on the GEMM's output, so the
    # GELU cannot run in oneDNN's epilogue: it runs after the correction, in the sigmoid form. The
    # `deploy` preset's symmetric weights and float attention put it back on the fused path.
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    config = diffquant.methods.make_config(
        "qdiffusion",
        preset=preset,
        wbits=8,
        abits=8,
        reconstruction={"weight_iters": 2, "act_iters": 2, "batch_size": 8},
    )
    quantized = diffquant.quantize(model, config, calibration, progress=False)
    deployed = export_model(quantized, "onednn")
    activation = deployed.denoiser.inner.transformer_blocks[0].ff.net[0]
    attention = deployed.denoiser.inner.transformer_blocks[0].attn1.processor
    if preset == "fast":
        assert isinstance(activation, SigmoidFormGELU) and activation.proj.input_sum_weight is not None
        assert isinstance(attention, QuantAttnProcessor) and attention._active()
    else:
        assert isinstance(activation, FusedGELU) and activation.proj.output_grid is not None  # GELU and u8 out
        linears = [m for m in deployed.denoiser.inner.modules() if isinstance(m, OneDNNInt8Linear)]
        assert linears and all(m.input_sum_weight is None for m in linears)
        assert not (isinstance(attention, QuantAttnProcessor) and attention._active())
    for index in (0, 3):
        batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[index])
        with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
            reference = quantized.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
            candidate = deployed.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample
        assert ((candidate - reference).abs().max() / reference.abs().max()).item() < 0.02


def test_bfloat16_compute_keeps_int8_kernels_and_float32_grids_and_io(w8a8, calibration, tmp_path):
    from diffquant.runtime.kernels_int4 import bf16_matmul_supported

    if not bf16_matmul_supported():
        pytest.skip("this CPU has no bfloat16 matrix units (the refusal is tested below)")
    float32 = export_model(w8a8, "onednn")
    bfloat16 = export_model(w8a8, "onednn", compute_dtype="bfloat16")
    assert bfloat16.quantization["kernels"] == float32.quantization["kernels"]
    assert bfloat16.quantization["compute_dtype"] == "bfloat16"
    inner = bfloat16.denoiser.inner
    kernels = [m for m in inner.modules() if isinstance(m, (OneDNNInt8Conv2d, OneDNNInt8Linear))]
    assert kernels and all(m.out_dtype == torch.bfloat16 for m in kernels)
    assert all(m.input.scales.dtype == torch.float32 and m.weight_scale.dtype == torch.float32 for m in kernels)
    norms = [m for m in inner.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.bfloat16 for m in norms)
    seen = []  # the timestep reaches the sinusoidal embedding in float32 (bfloat16 rounds 999 to 1000)
    inner.time_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    batch = next(calibration.batches(4))
    with torch.no_grad():
        bfloat16.denoiser(batch.sample, batch.timesteps.float())  # positionally
        bfloat16.denoiser(batch.sample, timestep=batch.timesteps.float())  # and by keyword
    reference, candidate = outputs(float32, calibration), outputs(bfloat16, calibration)
    assert seen[:2] == [torch.float32] * 2 and candidate.dtype == torch.float32
    relative = ((candidate - reference).norm() / reference.norm()).item()
    assert 0 < relative < 3e-2  # bfloat16 rounding, not a different model
    diffquant.save(w8a8, tmp_path / "q")  # the choice is part of an exported directory
    result = CliRunner().invoke(
        app,
        ["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "e"), "--compute-dtype", "bfloat16"],
    )
    assert result.exit_code == 0, result.output
    assert diffquant.load(tmp_path / "e").quantization["compute_dtype"] == "bfloat16"
    report = tmp_path / "e" / "export.json"  # a corrupted choice is one error naming the file
    report.write_text(report.read_text().replace('"bfloat16"', '"fp8"'))
    with pytest.raises(DiffquantError, match="export.json names compute_dtype 'fp8'"):
        diffquant.load(tmp_path / "e")


def test_bfloat16_compute_is_refused_clearly(w8a8, monkeypatch):
    with pytest.raises(DiffquantError, match="compute_dtype must be one of float32, bfloat16, got 'fp8'"):
        export_model(w8a8, "onednn", compute_dtype="fp8")
    monkeypatch.setattr("diffquant.runtime.export.bf16_matmul_supported", lambda: False)
    with pytest.raises(DiffquantError, match="needs a CPU with bfloat16 matrix units"):
        export_model(w8a8, "onednn", compute_dtype="bfloat16")
