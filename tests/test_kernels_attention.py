"""Integer attention matmuls (Q-Diffusion/EDA-DM) in deployed models: exact GEMM, agreement, per-step rows."""

import pytest
import torch

import diffquant
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.modules.surgery import attention_processors
from diffquant.quant import step_context
from diffquant.runtime import kernels_attention
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_attention import Int8AttnProcessor, int8_bmm
from diffquant.sampling import SamplerConfig
from tests.conftest import tiny_dit_model, tiny_unet_model

# per attention module: float rounding of the scales may move a softmax probability across a code
# boundary (one code of 255 changes an output by scale_p * |v|); otherwise the integer GEMMs are exact
TOLERANCE = 1e-3


def test_int8_bmm_is_exact_on_both_paths(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 17, 40), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, 23, 40), generator=generator, dtype=torch.int8)
    expected = torch.bmm(a.long(), b.long().transpose(1, 2))
    assert torch.equal(int8_bmm(a, b).long(), expected)  # small slices: the exact fp32 GEMM
    monkeypatch.setattr(kernels_attention, "SMALL_SLICE", 0)  # force the torch._int_mm loop
    assert torch.equal(int8_bmm(a, b).long(), expected)
    long = torch.randint(-128, 128, (2, 5, 3000), generator=generator, dtype=torch.int8)  # beyond fp32's exact range
    assert torch.equal(int8_bmm(long, long).long(), torch.bmm(long.long(), long.long().transpose(1, 2)))


def _quantized(model, per_step: bool, softmax_bits: int | None = 8):
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(4), progress=False)
    config = diffquant.methods.make_config(
        "naive", wbits=8, abits=8, attention_bits=8, softmax_bits=softmax_bits, activation_per_step=per_step
    )
    return diffquant.quantize(model, config, calibration, progress=False), calibration


def _outputs(model, batch):
    with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
        return model.denoiser(batch.sample, batch.timesteps, **batch.conditioning).sample


@pytest.mark.parametrize(
    ("builder", "per_step", "softmax_bits"),
    [(tiny_dit_model, False, 8), (tiny_unet_model, True, 8), (tiny_dit_model, True, None)],
)
def test_integer_attention_agrees_with_the_simulation(builder, per_step, softmax_bits):
    builder_model = builder()
    quantized, calibration = _quantized(builder_model, per_step, softmax_bits)
    deployed = export_model(quantized, "onednn", integer_attention=True)
    processors = dict(attention_processors(quantized.denoiser))
    assert deployed.quantization["kernels"]["attention: diffquant::int8_bmm (torch._int_mm)"] == len(processors)
    inner = deployed.denoiser.inner
    for name in processors:
        real = inner.get_submodule(name)
        assert isinstance(real, Int8AttnProcessor) and (real.probs is None) == (softmax_bits is None)
    if per_step:  # one bank tensor for the whole model: the graph finds the step's row once per call
        banks = {id(m.bank_timesteps) for m in inner.modules() if getattr(m, "per_step", False)}
        assert len(banks) == 1
    generator = torch.Generator().manual_seed(0)
    for index in range(len(calibration.steps)):
        batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[index])
        deployed.denoiser.clock.set(batch.timestep)
        for name, simulated in processors.items():
            attention = quantized.denoiser.get_submodule(name.removesuffix(".processor"))
            x = torch.randn(4, 12, attention.to_q.in_features, generator=generator) * 2
            with torch.no_grad(), step_context(batch.step_index, batch.timestep, batch.num_steps):
                reference, candidate = simulated(attention, x), inner.get_submodule(name)(attention, x)
            assert ((candidate - reference).abs().max() / reference.abs().max()).item() < TOLERANCE, name
            if per_step:  # the row of each bank is the step's own, read from the deployed clock
                scale, _ = inner.get_submodule(name).query.grid.params()
                assert scale.item() == simulated.query_quantizer.scale[index].item(), (name, index)
        # whole model: the int8 convs/linears' float rounding dominates; same criterion as test_runtime.py
        reference, candidate = _outputs(quantized, batch), _outputs(deployed, batch)
        quantization_error = (reference - _outputs(builder_model, batch)).pow(2).mean()
        assert (candidate - reference).pow(2).mean() < 0.25 * quantization_error


def test_integer_attention_is_opt_in():
    quantized, _ = _quantized(tiny_dit_model(), per_step=False)
    kernels = export_model(quantized, "onednn").quantization["kernels"]
    assert not any(kernel.startswith("attention") for kernel in kernels)


def test_integer_attention_compiles_into_one_graph_and_agrees():
    model = tiny_dit_model()
    quantized, calibration = _quantized(model, per_step=True)
    deployed = export_model(quantized, "onednn", compile=True, integer_attention=True)
    batch = next(iter(calibration.batches(8)))
    with torch.no_grad():
        explained = torch._dynamo.explain(deployed.denoiser.inner)(batch.sample, batch.timesteps, **batch.conditioning)
    assert explained.graph_break_count == 0, explained.break_reasons
    for index in (0, len(calibration.steps) - 1):
        batch = next(b for b in calibration.batches(8) if b.step_index == calibration.steps[index])
        reference, candidate = _outputs(quantized, batch), _outputs(deployed, batch)
        quantization_error = (reference - _outputs(model, batch)).pow(2).mean()
        assert (candidate - reference).pow(2).mean() < 0.25 * quantization_error
