"""The openvino backend: our calibrated grids, converted with OpenVINO and run on its int8 kernels."""

import builtins
import copy

import pytest
import torch

import diffquant
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.errors import DiffquantError
from diffquant.modules import quant_layers
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.quant import QuantSpec, step_context
from diffquant.runtime.backends.openvino import _attention_for_openvino
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_int4 import bf16_matmul_supported
from diffquant.runtime.kernels_openvino import (
    OpenVINOFakeQuantize,
    OpenVINOInt8Conv2d,
    OpenVINOInt8Linear,
    _symmetric_shift,
)
from diffquant.sampling import SamplerConfig
from tests.conftest import affine_8bit_layer, tiny_dit_model, tiny_unet_model

pytest.importorskip("openvino")


def _denoise(model, batch):
    with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
        return model.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample


def _relative(candidate, reference) -> float:
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module", params=["dit", "unet"])
def calibrated(request):
    model = tiny_dit_model() if request.param == "dit" else tiny_unet_model()
    return model, record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)


def test_every_int8_layer_runs_on_openvino_int8_and_agrees(calibrated):
    model, calibration = calibrated
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8)
    deployed = export_model(quantized, "openvino")
    linears = sum(layer.kind == "linear" for _, layer in quant_layers(quantized.denoiser))
    convs = sum(layer.kind == "conv2d" for _, layer in quant_layers(quantized.denoiser))
    expected = {"linear: openvino int8 FullyConnected": linears, "conv2d: openvino int8 Convolution": convs}
    assert deployed.quantization["kernels"] == {k: v for k, v in expected.items() if v}
    batches = [b for b in calibration.batches(8) if b.step_index in (calibration.steps[0], calibration.steps[-1])]
    # a UNet's 25 chained int8 layers flip a few codes at rounding ties (x * (1/s) against x / s), as the
    # onednn and inductor backends do (their tests allow 0.02)
    tolerance = 1e-3 if model.info.architecture == "dit" else 0.02
    for batch in batches:
        assert _relative(_denoise(deployed, batch), _denoise(quantized, batch)) < tolerance
    # OpenVINO's low-precision passes took every layer to int8: none was left a float GEMM
    runner = deployed.denoiser.inner
    ran = runner.executed_precisions()
    int8 = lambda layer_type: sum(n for k, n in ran.items() if k.startswith(layer_type) and k.endswith("8"))  # noqa: E731
    # the convolutions that take a DiT's patches run as one; a UNet's are all int8
    assert int8("FullyConnected") == linears and int8("Convolution") == convs
    assert not any(k.startswith(("FullyConnected f", "Convolution f", "FullyConnected bf")) for k in ran)
    assert runner.conversion_seconds > 0 and len(runner._compiled) == 1  # one signature, compiled once


def test_bfloat16_compute_is_the_precision_hint():
    if not bf16_matmul_supported():
        pytest.skip("bfloat16 compute needs AVX512-BF16 or AMX")
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8)
    deployed = export_model(quantized, "openvino", compute_dtype="bfloat16")
    assert deployed.denoiser.inner.precision == "bf16"
    batch = next(iter(calibration.batches(8)))
    out = _denoise(deployed, batch)
    assert out.dtype == torch.float32 and _relative(out, _denoise(quantized, batch)) < 0.08


def _int8_attention_ops(deployed) -> int:
    """Attention-shaped ops (fused subgraphs, SDPA, matmuls) that OpenVINO ran on 8-bit integers."""
    ran = deployed.denoiser.inner.executed_precisions()
    kinds = ("Subgraph", "ScaledDotProductAttention", "MatMul")
    return sum(n for k, n in ran.items() if k.split()[0] in kinds and k.split()[1] in ("i8", "u8"))


def _runtime_nodes(deployed) -> list[tuple[str, str]]:
    """(runtime precision, the traced ops it holds) of every node in the compiled graphs."""
    nodes = []
    for compiled, _ in deployed.denoiser.inner._compiled.values():
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()  # a fused node lists the traced ops it holds
            nodes.append((info["runtimePrecision"].astype(str), info["originalLayersNames"].astype(str)))
    return nodes


def _attention_kernel_precisions(deployed) -> set[str]:
    """The precisions OpenVINO ran the fused attention (PyTorch's SDPA, traced) at in the compiled graphs."""
    return {precision for precision, names in _runtime_nodes(deployed) if "scaled_dot_product_attention" in names}


@pytest.mark.parametrize("softmax_bits", [None, 8])
def test_quantized_attention_runs_on_openvino_int8_and_agrees(softmax_bits):
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    batch = next(iter(calibration.batches(8)))
    # Q, K, V quantized (as Q-Diffusion and EDA-DM do), the probabilities too or left in float (fused SDPA)
    options = {"wbits": 8, "abits": 8, "progress": False}
    quantized = diffquant.quantize(model, "naive", calibration, attention_bits=8, softmax_bits=softmax_bits, **options)
    deployed = export_model(quantized, "openvino")
    assert _relative(_denoise(deployed, batch), _denoise(quantized, batch)) < 0.02
    processors = [m for m in deployed.denoiser.inner.inner.modules() if isinstance(m, QuantAttnProcessor)]
    assert processors and all(isinstance(p.key_quantizer, OpenVINOFakeQuantize) for p in processors)
    # against the same model with float attention: OpenVINO ran its attention on 8-bit integers
    float_attention = export_model(diffquant.quantize(model, "naive", calibration, **options), "openvino")
    _denoise(float_attention, batch)
    assert _int8_attention_ops(deployed) > _int8_attention_ops(float_attention)


@pytest.mark.parametrize("symmetric", [True, False])
def test_attention_grids_run_openvinos_int8_attention_kernel(symmetric):
    """OpenVINO fuses FakeQuantize into its attention kernel only for grids without zero-point (others ran
    that attention in float: PixArt's self-attention 19 % slower). Symmetric grids have none; affine ones
    run on the symmetric range of the same codes (`OpenVINOAttention`)."""
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    batch = next(iter(calibration.batches(8)))
    options = {"wbits": 8, "abits": 8, "attention_bits": 8, "progress": False}
    quantized = diffquant.quantize(model, "naive", calibration, attention_symmetric=symmetric, **options)
    processor = next(m for m in quantized.denoiser.modules() if isinstance(m, QuantAttnProcessor))
    assert (float(processor.query_quantizer.zero_point.abs().max()) == 0.0) == symmetric
    deployed = export_model(quantized, "openvino")
    assert _relative(_denoise(deployed, batch), _denoise(quantized, batch)) < 0.02
    assert _attention_kernel_precisions(deployed) == {"i8"}


def test_symmetric_grids_with_8bit_probabilities_run_the_whole_attention_in_one_int8_node():
    """The deployed form that puts us ahead of NNCF (docs/DEPLOYMENT.md): with symmetric Q/K/V and 8-bit
    probabilities OpenVINO fuses QK^T, softmax, the probability grid and PV into one int8 node per attention
    (with float probabilities PV ran outside it, in float)."""
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    batch = next(iter(calibration.batches(8)))
    options = {"wbits": 8, "abits": 8, "attention_bits": 8, "attention_symmetric": True, "progress": False}
    quantized = diffquant.quantize(model, "naive", calibration, activation_symmetric=True, softmax_bits=8, **options)
    deployed = export_model(quantized, "openvino")
    assert _relative(_denoise(deployed, batch), _denoise(quantized, batch)) < 0.02
    fused = [(precision, names) for precision, names in _runtime_nodes(deployed) if "aten::softmax" in names]
    attentions = sum(isinstance(m, QuantAttnProcessor) for m in quantized.denoiser.modules())
    assert len(fused) == attentions > 0
    for precision, names in fused:
        assert precision == "i8"
        assert all(part in names for part in ("MatMul_1", "probs_quantizer", "value_quantizer")), names


@pytest.mark.parametrize("softmax_bits", [None, 8])
@pytest.mark.parametrize("masking", ["none", "additive", "boolean", "causal"])
def test_zero_point_attention_grids_move_onto_symmetric_ranges_exactly(softmax_bits, masking):
    """OpenVINOAttention runs affine Q/K/V grids on the symmetric range of the same codes and undoes each
    shift (K: a constant per score row, Q: a per-key mask, V: the row's probability sum): the simulation's
    attention, to float rounding."""
    generator = torch.Generator().manual_seed(0)
    # off-centre operands: each affine grid's zero-point lies far from the middle of its codes
    query = torch.randn(2, 3, 10, 16, generator=generator) + 1.5
    key = torch.randn(2, 3, 12, 16, generator=generator) - 2.0
    value = torch.randn(2, 3, 12, 16, generator=generator) * 0.5 + 1.0
    probs = QuantSpec("uint8") if softmax_bits else None
    simulated = QuantAttnProcessor(QuantSpec("int8", symmetric=False), probs)
    for quantizer, operand in zip(simulated.quantizers(), (query, key, value), strict=False):
        quantizer.calibrate_static(operand)
    if probs is not None:
        simulated.probs_quantizer.calibrate_static(torch.rand(64, generator=generator) * 0.9)
    mask = {
        "none": None,
        "additive": torch.randn(1, 1, 10, 12, generator=generator),
        "boolean": torch.rand(2, 1, 10, 12, generator=generator) > 0.3,
        "causal": None,
    }[masking]
    arguments = (query, key, value, mask, masking == "causal", None, False)
    reference = simulated._attention(*arguments)
    deployed = copy.deepcopy(simulated)
    _attention_for_openvino(deployed)
    grids = [deployed.query_quantizer, deployed.key_quantizer, deployed.value_quantizer]
    assert all(isinstance(grid, OpenVINOFakeQuantize) and abs(grid.zero - 128) > 20 for grid in grids)
    out = deployed._attention(*arguments)
    # a quantized probability can flip a code where float rounding moves it across a rounding boundary (a
    # few of 1,440 outputs, by at most s_p * |v|): mean squared error against the reference's energy
    relative_mse = lambda x: float(((x - reference) ** 2).mean() / (reference**2).mean())  # noqa: E731
    assert relative_mse(out) < 1e-6
    # the corrections matter: the same shifted operands in plain attention are far off
    shifted = [_symmetric_shift(grid, x)[0] for grid, x in zip(grids, (query, key, value), strict=True)]
    plain = torch.nn.functional.scaled_dot_product_attention(*shifted, attn_mask=mask, is_causal=masking == "causal")
    assert relative_mse(plain) > 1e-2


def test_attention_symmetric_without_quantized_attention_is_refused():
    with pytest.raises(diffquant.errors.ConfigError, match="attention_bits"):
        diffquant.methods.make_config("naive", attention_symmetric=True)


def test_symmetric_activation_grids_have_no_zero_point_and_run_on_int8():
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    batch = next(iter(calibration.batches(8)))
    quantized = diffquant.quantize(
        model, "naive", calibration, progress=False, wbits=8, abits=8, activation_symmetric=True
    )
    inputs = [layer.input_quantizer for _, layer in quant_layers(quantized.denoiser)]
    assert inputs and all(q.fmt.signed and float(q.zero_point.abs().max()) == 0.0 for q in inputs)
    deployed = export_model(quantized, "openvino")
    assert _relative(_denoise(deployed, batch), _denoise(quantized, batch)) < 1e-3
    ran = deployed.denoiser.inner.executed_precisions()
    linears = sum(layer.kind == "linear" for _, layer in quant_layers(quantized.denoiser))
    assert sum(n for k, n in ran.items() if k.startswith("FullyConnected") and k.endswith("8")) == linears


@pytest.mark.parametrize(("method", "options"), [("dgq", {}), ("naive", {"abits": None})])
def test_activation_symmetric_where_it_cannot_apply_is_refused(method, options):
    with pytest.raises(diffquant.errors.ConfigError, match="activation_symmetric=True does not apply"):
        diffquant.methods.make_config(method, activation_symmetric=True, **options)


def test_weight_only_layers_keep_integer_codes_and_agree():
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    batch = next(iter(calibration.batches(8)))
    weight_only = diffquant.quantize(model, "naive", calibration, progress=False, wbits=4, abits=None)
    deployed = export_model(weight_only, "openvino")
    assert set(deployed.quantization["kernels"]) == {
        "linear: openvino float GEMM, int8 weight codes",
        "conv2d: openvino float GEMM, int8 weight codes",
    }
    assert _relative(_denoise(deployed, batch), _denoise(weight_only, batch)) < 1e-4


def test_per_step_grids_run_one_graph_per_step_and_agree(tmp_path):
    import json

    from typer.testing import CliRunner

    from diffquant.cli import app

    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    options = {"wbits": 8, "abits": 8, "attention_bits": 8, "activation_per_step": True, "progress": False}
    quantized = diffquant.quantize(model, "naive", calibration, **options)
    deployed = export_model(quantized, "openvino")
    assert "linear: openvino int8 FullyConnected" in deployed.quantization["kernels"]
    batches = list(calibration.batches(8))
    first, last = batches[0], batches[-1]
    assert first.step_index != last.step_index
    # the same inputs under two steps' contexts: only the grids differ, so agreement at both needs both rows
    at_last = type(last)(**{**vars(first), "step_index": last.step_index, "timestep": last.timestep})
    simulated = [_denoise(quantized, first), _denoise(quantized, at_last)]
    assert _relative(simulated[1], simulated[0]) > 0.1  # measured 0.44
    # within the quantized-attention tolerance of the tests above (tie rounding; measured 3e-3 and 1e-7)
    assert _relative(_denoise(deployed, first), simulated[0]) < 0.02
    assert _relative(_denoise(deployed, at_last), simulated[1]) < 0.02
    assert len(deployed.denoiser.inner._compiled) == 2  # one graph per step, each with its step's grids
    # no single OpenVINO IR holds every step's grids: export says so instead of writing one step's
    diffquant.save(quantized, tmp_path / "q")
    command = ["export", "--model", str(tmp_path / "q"), "--backend", "openvino", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    ir = json.loads((tmp_path / "e" / "export.json").read_text())["openvino_ir"]
    assert ir["path"] is None and "per-step grids" in ir["not_written"]
    assert not (tmp_path / "e" / "openvino").exists()


def test_per_step_graphs_that_would_not_fit_in_memory_are_refused(monkeypatch):
    from diffquant.runtime.backends import openvino as backend

    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    quantized = diffquant.quantize(
        model, "naive", calibration, progress=False, wbits=8, abits=8, activation_per_step=True
    )
    monkeypatch.setattr(backend, "PER_STEP_GRAPH_BYTES", 1024)
    with pytest.raises(DiffquantError, match="one graph per step.*--backend onednn.*activation_per_step=False"):
        export_model(quantized, "openvino")


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_affine_8bit_weights_keep_their_correction(kind):
    layer, x = affine_8bit_layer(kind)
    real = OpenVINOInt8Linear(layer) if kind == "linear" else OpenVINOInt8Conv2d(layer)
    import openvino as ov

    model = ov.convert_model(real.eval(), example_input=(x,))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # bf16 on some CPUs
    with torch.no_grad():
        reference, emulated = layer(x), real(x)
    lowered = torch.from_numpy(compiled([x.numpy()])[0])
    for candidate in (emulated, lowered):
        assert _relative(candidate, reference) < 1e-4


def test_missing_openvino_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    model = tiny_dit_model()
    calibration = record_trajectories(model, 4, SamplerConfig("ddim", 2), UniformSteps(2), progress=False)
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8)
    with pytest.raises(DiffquantError, match=r"pip install 'diffquant\[openvino\]'"):
        export_model(quantized, "openvino")


def test_export_writes_openvino_ir_that_runs_without_diffquant(tmp_path):
    import json

    import openvino as ov
    from typer.testing import CliRunner

    from diffquant.cli import app
    from diffquant.families import denoise

    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    diffquant.save(diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8), tmp_path / "q")
    command = ["export", "--model", str(tmp_path / "q"), "--backend", "openvino", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "openvino int8 FullyConnected" in result.output
    ir = json.loads((tmp_path / "e" / "export.json").read_text())["openvino_ir"]
    assert ir["path"] == "openvino/denoiser.xml" and ir["precision_hint"] == "f32"
    assert ir["inputs"] == ["hidden_states", "timestep", "class_labels"]
    # plain OpenVINO, any batch (the IR's dimensions are dynamic), the same numbers as diffquant's deployment
    graph = ov.Core().compile_model(str(tmp_path / "e" / ir["path"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x, t, y = torch.randn(5, 1, 8, 8), torch.full((5,), 500), torch.tensor([1, 2, 3, 4, 5])
    plain = torch.from_numpy(graph({"hidden_states": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})[0])
    assert ir["batch_3_max_relative_error"] < 1e-5  # checked at export on another batch size than it was traced at
    loaded = diffquant.load(tmp_path / "e")
    assert loaded.quantization["backend"] == "openvino"
    assert torch.allclose(plain, denoise(loaded.denoiser, x, t, {"class_labels": y}), atol=1e-5)


def test_call_arguments_that_cannot_be_graph_constants_are_one_clear_error(monkeypatch):
    import numpy as np

    from diffquant.runtime import kernels_openvino

    model = tiny_dit_model()
    calibration = record_trajectories(model, 4, SamplerConfig("ddim", 2), UniformSteps(2), progress=False)
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=8, abits=8)
    runner = export_model(quantized, "openvino").denoiser.inner
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(DiffquantError, match="not a ndarray; pass it as a tensor"):
        runner(x, np.array([500, 500]), labels)
    with pytest.raises(DiffquantError, match="OpenVINO could not convert this model.*--backend onednn"):
        runner(x, 500, labels)  # the DiT reads timestep.shape: tracing fails inside diffusers
    # every new signature compiles a graph: shapes that change at every call would compile without end
    monkeypatch.setattr(kernels_openvino, "MAX_GRAPHS", 2)
    for batch in (1, 2):
        runner(torch.randn(batch, 1, 8, 8), torch.full((batch,), 500), labels[:batch])
    with pytest.raises(DiffquantError, match="compiled 2 graphs.*fixed shapes"):
        runner(torch.randn(3, 1, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 3]))
