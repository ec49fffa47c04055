"""Issue 16's text-aware and mixed-precision 4-bit methods: viditq, mixdq, dgq, and the parts they share
(log2 softmax grid, k-means range groups, BOS-token handling, sensitivity probes)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import diffquant
from diffquant.calibration import CalibrationSet, UniformSteps, call_denoiser, record_trajectories
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import make_config
from diffquant.modules import LowRankQuantLayer, quant_layers
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.pipelines import model_from_pipeline, record_pipeline_calibration
from diffquant.quant import Quantizer, QuantSpec
from diffquant.quant.range_groups import grouped_ranges, kmeans_labels
from diffquant.sampling import SamplerConfig
from tests.conftest import tiny_dit_model
from tests.pipeline_models import tiny_sd3_pipeline

PROMPTS = ["a shirt", "a sneaker, studio shot", "a photo of a bag", "a coat"]


def _outputs(model, data: CalibrationSet) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call_denoiser(model.denoiser, batch) for batch in data.batches(64)]


def _relative_error(reference, candidate, data: CalibrationSet) -> float:
    pairs = zip(_outputs(reference, data), _outputs(candidate, data), strict=True)
    errors = [((a - b).pow(2).sum().item(), a.pow(2).sum().item()) for a, b in pairs]
    return sum(e for e, _ in errors) / sum(n for _, n in errors)


# --- numeric core -------------------------------------------------------------------------------
def test_log2_quantizer_reproduces_its_grid():
    quantizer = Quantizer(QuantSpec("log3", dynamic=True))
    scale = 0.8
    grid = scale * 2.0 ** -torch.arange(8.0)  # codes 0..7 of a 3-bit log grid
    probs = torch.cat([grid, torch.tensor([0.0, scale * 2**-0.4, scale * 2**-0.6, scale * 2**-20])])
    out = quantizer(probs)
    assert torch.equal(out[:8], grid)  # every grid point is exact; the dynamic scale is the maximum
    assert out[8] == grid[-1] and out[11] == grid[-1]  # zero and tiny values take the smallest level
    assert out[9] == grid[0] and out[10] == grid[1]  # rounding happens in the log domain


def test_kmeans_range_groups_isolate_outlier_channels_and_beat_one_range():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, 32, generator=generator)
    x[..., 3] *= 40.0
    x[..., 17] *= 25.0
    channel_low, channel_high = x.amin((0, 1)), x.amax((0, 1))
    labels = kmeans_labels(torch.stack([channel_low, channel_high], 1), 4)
    normal = [c for c in range(32) if c not in (3, 17)]
    assert labels[3] != labels[normal[0]] and labels[17] != labels[normal[0]]
    low, high = grouped_ranges(channel_low, channel_high, 4)
    assert torch.all(low <= channel_low) and torch.all(high >= channel_high)  # a group's range covers its members
    assert len(set(zip(low.tolist(), high.tolist(), strict=True))) <= 4

    errors = {}
    for groups in (None, 4):
        spec = QuantSpec("uint4", symmetric=False)
        if groups:
            spec = spec.replace(granularity="per_channel", axis=-1, range_groups=groups)
        quantizer = Quantizer(spec)
        quantizer.start_observing()
        quantizer(x)
        quantizer.finish_observing()
        errors[groups] = (quantizer(x) - x)[..., normal].pow(2).mean().item()
    assert errors[4] < 0.05 * errors[None], errors
    with pytest.raises(ConfigError, match="per_channel"):
        QuantSpec("uint4", symmetric=False, range_groups=4)


def test_leading_token_is_out_of_the_range_and_exact():
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0] *= 300.0  # a BOS token hundreds of times larger than the rest, as in CLIP embeddings
    plain, aware = (
        Quantizer(QuantSpec("uint8", symmetric=False)),
        Quantizer(QuantSpec("uint8", symmetric=False, fp_leading_tokens=1)),
    )
    for quantizer in (plain, aware):
        quantizer.start_observing()
        quantizer(x)
        quantizer.finish_observing()
    assert aware.scale < plain.scale / 50  # the range is set by the other tokens only
    out = aware(x)
    assert torch.equal(out[:, 0], x[:, 0])
    rest_error = (out[:, 1:] - x[:, 1:]).pow(2).mean()
    assert rest_error < 0.01 * (plain(x)[:, 1:] - x[:, 1:]).pow(2).mean()


def test_attention_keeps_the_bos_column_float_and_logs_the_rest():
    processor = QuantAttnProcessor(None, QuantSpec("log4", dynamic=True), fp_text_bos=True)
    probs = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(2)).softmax(-1)
    processor._stream_tokens = (4, 3)  # SD3 joint attention: 4 image keys, then 3 text keys
    processor.inner = type("JointAttnProcessor2_0", (), {})()
    assert processor.bos_column(7) == 4
    out = processor._quantize_probs(probs)
    assert torch.equal(out[..., 4], probs[..., 4])
    others = torch.cat([probs[..., :4], probs[..., 5:]], -1)
    codes = -torch.log2(torch.cat([out[..., :4], out[..., 5:]], -1) / others.max())
    assert torch.allclose(codes, codes.round(), atol=1e-5)  # on the log2 grid whose scale skips the BOS column
    processor._stream_tokens = (4, 3)
    assert processor.bos_column(3) == 0  # plain cross-attention: the text is all the keys
    with pytest.raises(DiffquantError, match="BOS"):
        processor.bos_column(9)


# --- text-to-image fixtures ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """A tiny SD3 pipeline whose attention outputs carry outlier channels (the float function unchanged)."""
    pipeline = tiny_sd3_pipeline(tmp_path_factory.mktemp("tok"))
    with torch.no_grad():
        for block in pipeline.transformer.transformer_blocks:
            # attention is linear in V: scale V channels up and the output projection's inputs down
            factor = torch.ones(block.attn.to_v.out_features)
            factor[[1, 9]] = 30.0
            block.attn.to_v.weight.mul_(factor[:, None])
            block.attn.to_v.bias.mul_(factor)
            block.attn.to_out[0].weight.div_(factor[None, :])
    model = model_from_pipeline(pipeline, "tiny-sd3")
    calibration = record_pipeline_calibration(model, PROMPTS, steps=3, guidance_scale=3.0)
    return model, calibration


@pytest.fixture(scope="module")
def mixdq_t2i(t2i):
    model, calibration = t2i
    return diffquant.quantize(model, make_config("mixdq", "fast"), calibration, progress=False)


@pytest.fixture(scope="module")
def dgq_t2i(t2i):
    model, calibration = t2i
    return diffquant.quantize(model, make_config("dgq", "fast", groups=4), calibration, progress=False)


# --- mixdq --------------------------------------------------------------------------------------
def test_mixdq_keeps_the_bos_token_of_the_text_stream_out_of_the_ranges(t2i, mixdq_t2i):
    model, calibration = t2i
    details = mixdq_t2i.quantization["details"]
    layers = dict(quant_layers(mixdq_t2i.denoiser))
    assert (
        "context_embedder" in details["text_layers"]
        and "transformer_blocks.0.attn.add_k_proj" in details["text_layers"]
    )
    assert "transformer_blocks.0.attn.to_q" not in details["text_layers"]
    embedder = layers["context_embedder"]
    assert embedder.input_quantizer.spec.fp_leading_tokens == 1
    text = calibration.conditioning["encoder_hidden_states"][:4].clone()
    text[:, 0] *= 100.0  # a BOS far outside the calibrated range is still computed exactly
    with torch.no_grad():
        out = embedder(text)
        exact = torch.nn.functional.linear(text, embedder.dequantized_weight(), embedder.bias)
    assert torch.allclose(out[:, :1], exact[:, :1], rtol=1e-6, atol=1e-6)  # float input, same weight
    assert not torch.equal(out[:, 1:], exact[:, 1:])  # the other tokens are quantized
    assert layers["transformer_blocks.0.attn.to_q"].input_quantizer.spec.fp_leading_tokens == 0


def test_mixdq_integer_program_meets_the_budget_with_decoupled_groups(mixdq_t2i):
    details = mixdq_t2i.quantization["details"]
    layers = dict(quant_layers(mixdq_t2i.denoiser))
    sizes = {name: layer.weight_codes.numel() for name, layer in layers.items()}
    bits = {name: layer.weight_quantizer.spec.bits for name, layer in layers.items()}
    assert bits == details["weight_bits"]
    assert sum(sizes[n] * bits[n] for n in sizes) <= 4 * sum(sizes.values())  # W4: average <= 4 bits
    content = set(details["content_layers"])
    assert "transformer_blocks.0.ff.net.2" in content and "transformer_blocks.0.attn.to_q" not in content
    assert {bits[n] for n in content} <= {2, 4, 8} and {bits[n] for n in layers if n not in content} <= {4, 8}
    assert len(details["protected_inputs"]) == 1 and layers[details["protected_inputs"][0]].input_quantizer is None


def test_regridded_quantizer_keeps_the_calibrated_range_at_another_width():
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(3)) * 3 + 1
    for symmetric, fmt in ((False, "uint8"), (True, "int8")):
        quantizer = Quantizer(QuantSpec(fmt, symmetric=symmetric, observer="minmax"))
        quantizer.start_observing()
        quantizer(x)
        quantizer.finish_observing()
        four = quantizer.regridded(quantizer.spec.replace(format=fmt.replace("8", "4")))
        out = four(x)
        assert out.unique().numel() <= 16 and (out - x).abs().max() <= four.scale * 0.5 + 1e-5
        assert torch.allclose(out.amax(), quantizer(x).amax(), rtol=0.1)  # the same range, a coarser grid
        same = quantizer.regridded(quantizer.spec)  # the same width reproduces the calibrated grid
        assert torch.allclose(same.scale, quantizer.scale) and torch.equal(same.zero_point, quantizer.zero_point)


def test_mixdq_activation_mixed_precision_meets_its_budget_and_beats_uniform_4bit(t2i, tmp_path):
    from diffquant.engines.sensitivity import input_sizes

    model, calibration = t2i
    config = make_config("mixdq", "mixed-activations", average_activation_bits=6.0, protect_share=0.0)
    mixed = diffquant.quantize(model, config, calibration, progress=False)
    details = mixed.quantization["details"]
    inputs = {n: m for n, m in quant_layers(mixed.denoiser) if m.input_quantizer is not None}
    plan = details["activation_bits"]
    assert plan == {n: m.input_quantizer.spec.bits for n, m in inputs.items()}
    assert set(plan.values()) == {4, 8}  # genuinely mixed
    batch = next(calibration.batches(64))
    sizes = input_sizes(mixed.denoiser, inputs, batch)
    assert sum(sizes[n] * b for n, b in plan.items()) <= 6.0 * sum(sizes.values())
    assert details["average_activation_bits"] <= 6.0 and details["activation_plan_output_error"]  # one per feasible K

    uniform = diffquant.quantize(model, make_config("mixdq", "fast", abits=4, protect_share=0.0), calibration)
    assert "activation_bits" not in uniform.quantization["details"]  # abits is the narrowest width: no plan
    ours, theirs = _relative_error(model, mixed, calibration), _relative_error(model, uniform, calibration)
    assert ours < theirs, (ours, theirs)

    diffquant.save(mixed, tmp_path / "mixed")
    reloaded = diffquant.load(tmp_path / "mixed")
    assert {n: m.input_quantizer.spec.bits for n, m in quant_layers(reloaded.denoiser) if m.input_quantizer} == plan
    for a, b in zip(_outputs(mixed, calibration), _outputs(reloaded, calibration), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="average_activation_bits needs quantized activations"):
        make_config("mixdq", "fast", abits=None, average_activation_bits=7.0).validate()


def test_mixdq_and_dgq_reload_from_a_pipeline_directory_identically(t2i, mixdq_t2i, dgq_t2i, tmp_path):
    _, calibration = t2i
    for name, quantized in (("mixdq", mixdq_t2i), ("dgq", dgq_t2i)):
        diffquant.save(quantized, tmp_path / name)
        reloaded = diffquant.load(tmp_path / name)
        assert reloaded.quantization["method"] == name
        before, after = dict(quant_layers(quantized.denoiser)), dict(quant_layers(reloaded.denoiser))
        assert {
            n: (m.weight_quantizer.spec, m.input_quantizer and m.input_quantizer.spec) for n, m in after.items()
        } == {n: (m.weight_quantizer.spec, m.input_quantizer and m.input_quantizer.spec) for n, m in before.items()}
        for a, b in zip(_outputs(quantized, calibration), _outputs(reloaded, calibration), strict=True):
            assert torch.equal(a, b)


def test_mixdq_exports_with_the_bos_layers_off_the_integer_kernels(t2i, mixdq_t2i):
    from diffquant.runtime.export import export_model

    _, calibration = t2i
    backend = "onednn" if torch.backends.mkldnn.is_available() else "fake"
    exported = export_model(mixdq_t2i, backend)
    if backend == "onednn":  # a kernel would quantize the BOS token too: text-stream layers stay simulated
        deployed = exported.denoiser.inner
        assert type(deployed.get_submodule("context_embedder")).__name__ == "DequantizedLayer"
        assert type(deployed.get_submodule("transformer_blocks.0.attn.to_q")).__name__ == "OneDNNInt8Linear"
    for a, b in zip(_outputs(mixdq_t2i, calibration), _outputs(exported, calibration), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# --- dgq ----------------------------------------------------------------------------------------
def test_dgq_groups_ranges_quantizes_softmax_on_log2_and_keeps_bos(dgq_t2i):
    layers = dict(quant_layers(dgq_t2i.denoiser))
    spec = layers["transformer_blocks.0.attn.to_out.0"].input_quantizer.spec
    assert (spec.granularity, spec.range_groups, spec.per_step) == ("per_channel", 4, True)
    assert layers["context_embedder"].input_quantizer.spec.fp_leading_tokens == 1
    processors = [m for m in dgq_t2i.denoiser.modules() if isinstance(m, QuantAttnProcessor)]
    assert processors and all(p.fp_text_bos and p.probs_quantizer.spec.format == "log8" for p in processors)
    scales = layers["transformer_blocks.0.attn.to_out.0"].input_quantizer.scale
    assert scales.shape[0] == 3 and len(scales[0].unique()) <= 4  # one row per step, at most G distinct ranges


@pytest.mark.parametrize(
    ("wbits", "abits", "log_softmax"),
    [(4, 4, True), (8, 8, False)],  # at W4A8 both sit at the same 4-bit weight error on this model
)
def test_dgq_beats_naive_per_tensor_on_outlier_channels(t2i, wbits, abits, log_softmax):
    model, calibration = t2i
    config = make_config("dgq", "fast", wbits=wbits, abits=abits, log_softmax=log_softmax)
    dgq = diffquant.quantize(model, config, calibration, progress=False)
    naive = diffquant.quantize(model, "naive", calibration, progress=False, wbits=wbits, abits=abits)
    ours, theirs = _relative_error(model, dgq, calibration), _relative_error(model, naive, calibration)
    assert ours < 0.7 * theirs, (ours, theirs)


def test_dgq_brecq_reconstruction_beats_round_to_nearest_and_resumes_after_a_kill(t2i, dgq_t2i, tmp_path, monkeypatch):
    model, calibration = t2i
    options = {"groups": 4, "checkpoint_dir": str(tmp_path), "reconstruction": {"weight_iters": 150}}
    config = make_config("dgq", "reconstructed", **options)
    assert config.reconstruct and config.reconstruction.weight_lr == 1e-2  # the preset's engine settings kept
    brecq = diffquant.quantize(model, config, calibration, progress=False)
    assert brecq.quantization["details"]["rounding"] == "adaround"
    assert dgq_t2i.quantization["details"]["rounding"] == "nearest"
    ours, theirs = _relative_error(model, brecq, calibration), _relative_error(model, dgq_t2i, calibration)
    assert ours < 0.9 * theirs, (ours, theirs)
    assert not any(tmp_path.iterdir())  # the finished run deletes its checkpoint
    assert make_config("dgq", "paper-sd").reconstruction.weight_iters == 20000

    # killed after two blocks, rerun with the same settings: resumes to the identical model
    from tests.test_reconstruction import quantize_killed

    options = {**options, "preset": "reconstructed"}
    del options["checkpoint_dir"]
    quantize_killed(model, "dgq", calibration, tmp_path / "killed", 2, monkeypatch, **options)
    resumed = diffquant.quantize(
        model, "dgq", calibration, progress=False, checkpoint_dir=str(tmp_path / "killed"), **options
    )
    assert resumed.quantization["details"]["resumed_units"] >= 2
    for a, b in zip(_outputs(brecq, calibration), _outputs(resumed, calibration), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["mixdq", "dgq"])
def test_text_methods_refuse_a_model_without_text(method):
    model = tiny_dit_model()
    calibration = record_trajectories(model, 2, SamplerConfig("ddim", 2), UniformSteps(2), seed=1, progress=False)
    with pytest.raises(DiffquantError, match="no text input"):
        diffquant.quantize(model, make_config(method, "fast"), calibration, progress=False)
    # refused before any calibration data is recorded (recording would call the model)
    calls = []
    model.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(DiffquantError, match="no text input"):
        diffquant.quantize(model, make_config(method, "fast"), progress=False)
    assert not calls


# --- viditq -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_and_calibration():
    model = tiny_dit_model()
    calibration = record_trajectories(model, 8, SamplerConfig("ddim", 4), UniformSteps(2), seed=1, progress=False)
    return model, calibration


def test_viditq_balances_rotates_and_allocates_within_the_budget(dit_and_calibration, tmp_path):
    model, calibration = dit_and_calibration
    config = make_config("viditq", "fast", sensitivity_samples=8)
    quantized = diffquant.quantize(model, config, calibration, progress=False)
    details = quantized.quantization["details"]
    assert {"pos_embed.proj", "proj_out_2", "transformer_blocks.0.norm1.linear"} <= set(details["kept_fp"])
    balanced = {n: m for n, m in quantized.denoiser.named_modules() if isinstance(m, LowRankQuantLayer)}
    assert balanced and all(m.rotate and m.rank == 0 for m in balanced.values())
    assert any(not torch.all(m.smooth == 1) for m in balanced.values())
    sizes = {n: m.residual.weight_codes.numel() for n, m in balanced.items()}
    bits = {n: m.residual.weight_quantizer.spec.bits for n, m in balanced.items()}
    assert bits == details["weight_bits"] and set(bits.values()) <= {4, 6, 8}
    assert sum(sizes[n] * bits[n] for n in sizes) <= details["budget_bits"] == round(4.25 * sum(sizes.values()))
    assert max(bits.values()) > 4  # the budget above 4 bits is spent on the most sensitive layers
    spec = next(iter(balanced.values())).residual.input_quantizer.spec
    assert (spec.granularity, spec.dynamic, spec.symmetric) == ("per_token", True, False)

    diffquant.save(quantized, tmp_path / "q")
    # a Hadamard rotation is a function of the channel count: rebuilt on load, not stored (it was 2/3 of the file)
    with safe_open(str(tmp_path / "q" / "quantized.safetensors"), "pt") as stored:
        names = stored.keys()  # a safetensors handle is not iterable itself
    assert names and not any(name.endswith(".rotation") for name in names)
    reloaded = diffquant.load(tmp_path / "q")
    for name, layer in balanced.items():
        again = reloaded.denoiser.get_submodule(name)
        assert torch.equal(again.smooth, layer.smooth) and again.residual.weight_quantizer.spec.bits == bits[name]
        assert torch.equal(again.rotation, layer.rotation)
    for a, b in zip(_outputs(quantized, calibration), _outputs(reloaded, calibration), strict=True):
        assert torch.equal(a, b)


def test_viditq_at_w8_gives_every_layer_8_bits_without_probing(dit_and_calibration):
    model, calibration = dit_and_calibration
    quantized = diffquant.quantize(model, make_config("viditq", "fast", wbits=8), calibration, progress=False)
    assert set(quantized.quantization["details"]["weight_bits"].values()) == {8}


def test_viditq_beats_naive_at_w4a4_on_a_dit(dit_and_calibration):
    model, calibration = dit_and_calibration
    ours = diffquant.quantize(model, make_config("viditq", "fast", abits=4), calibration, progress=False)
    naive = diffquant.quantize(model, "naive", calibration, progress=False, wbits=4, abits=4)
    assert _relative_error(model, ours, calibration) < 0.5 * _relative_error(model, naive, calibration)


def test_viditq_runs_on_a_text_to_image_mmdit_and_scores_text_layers_by_content(t2i):
    model, calibration = t2i
    quantized = diffquant.quantize(model, make_config("viditq", "fast"), calibration, progress=False)
    content = set(quantized.quantization["details"]["content_layers"])
    assert "transformer_blocks.0.ff_context.net.2" in content and "transformer_blocks.0.attn.to_q" not in content


def test_presets_hold_the_paper_defaults():
    viditq = make_config("viditq", "paper")
    assert (viditq.wbits, viditq.abits, viditq.weight_bit_choices, viditq.rotate) == (4, 8, (4, 6, 8), True)
    mixdq = make_config("mixdq", "paper")
    assert (mixdq.content_bit_choices, mixdq.quality_bit_choices, mixdq.protect_share) == ((2, 4, 8), (4, 8), 0.01)
    assert mixdq.activation_spec().observer == "ema" and mixdq.activation_spec().granularity == "per_tensor"
    dgq = make_config("dgq", "paper")
    assert (dgq.groups, dgq.activation_per_step, dgq.softmax_spec().format) == (8, True, "log8")
    with pytest.raises(ConfigError, match="alpha"):
        make_config("viditq", "fast", alpha=2.0)
