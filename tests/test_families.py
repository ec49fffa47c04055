"""Model-family adapters on tiny seeded random instances: calling convention, block discovery, image
stream, wrapped attention, nested conditioning, loading rules, and the method x setting x family matrix."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import diffquant
from diffquant.calibration import CalibrationSet
from diffquant.errors import ConfigError, DiffquantError
from diffquant.families import adapter_for, denoise
from diffquant.model import DDPM_LINEAR_SCHEDULE, DiffusionModel, ModelInfo
from diffquant.modules import attention_processors
from diffquant.modules.attention import wrap_processor
from diffquant.quant import QuantSpec
from tests.family_models import (
    BUILDERS,
    METHODS,
    SETTINGS,
    TINY_OPTIONS,
    build_family,
    family_inputs,
    family_model,
    matrix_row,
)

SRC = Path(__file__).resolve().parents[1] / "src"
EXPECTED = {  # family -> (adapter, block classes, number of blocks)
    "unet": ("unet2d", {"ResnetBlock2D", "Attention"}, 12),
    "sd-unet": ("unet2d-condition", {"ResnetBlock2D", "BasicTransformerBlock"}, 12),
    "sdxl-unet": ("unet2d-condition", {"ResnetBlock2D", "BasicTransformerBlock"}, 12),
    "dit": ("dit", {"BasicTransformerBlock"}, 2),
    "pixart": ("pixart", {"BasicTransformerBlock"}, 2),
    "sana": ("sana", {"SanaTransformerBlock"}, 2),
    "sd3": ("sd3", {"JointTransformerBlock"}, 2),
    "flux": ("flux", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}, 2),
    "wan": ("wan", {"WanTransformerBlock"}, 2),
    "qwenimage": ("qwenimage", {"QwenImageTransformerBlock"}, 2),
}


def _import_graph() -> dict[str, set[str]]:
    """diffquant module -> diffquant modules it imports (function-level imports included)."""
    modules = {}
    for path in (SRC / "diffquant").rglob("*.py"):
        modules[".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")] = path

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffquant"):
                edges.update(resolve(f"{node.module}.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.Import):
                edges.update(resolve(a.name) for a in node.names if a.name.startswith("diffquant"))
        graph[name] = edges - {name}
    return graph


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in graph[node]:
            if state.get(child) == 1:
                raise AssertionError(" -> ".join(path[path.index(child) :] + [child]) if child in path else child)
            if child not in state:
                visit(child, path + [child])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    # nothing below the zoo imports it
    below = (
        "diffquant.model",
        "diffquant.families",
        "diffquant.runtime",
        "diffquant.calibration",
        "diffquant.engines",
        "diffquant.sampling",
        "diffquant.evaluation",
        "diffquant.training",
    )
    for name, edges in graph.items():
        if name.startswith(below):
            assert not any(e.startswith("diffquant.zoo") for e in edges), name


STANDALONE_IMPORTS = """
import importlib, pkgutil, sys
import diffquant
names = sorted(m.name for m in pkgutil.walk_packages(diffquant.__path__, "diffquant."))
for name in names:
    for loaded in [m for m in sys.modules if m == "diffquant" or m.startswith("diffquant.")]:
        if loaded not in ("diffquant.runtime.kernels", "diffquant.runtime.kernels_attention"):  # torch ops: once
            del sys.modules[loaded]
    importlib.import_module(name)  # each module first, in a clean diffquant namespace
print(len(names))
"""


@pytest.mark.slow
def test_every_module_imports_first_without_a_cycle():
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", STANDALONE_IMPORTS], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 80


def test_bottom_layers_import_alone_in_a_fresh_interpreter():
    code = "import diffquant.runtime.storage, diffquant.model, diffquant.families, diffquant.sampling"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_adapter_calls_by_keyword_and_returns_the_prediction(family):
    model = build_family(family)
    adapter = adapter_for(model)
    assert adapter.name == EXPECTED[family][0]
    sample, timestep, conditioning = adapter.example_inputs(model, 2, torch.Generator().manual_seed(0))
    calls = []  # positional arguments are the bug this guards against (SD3's second one is the text)
    model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((len(args), set(kwargs))), with_kwargs=True)
    with torch.no_grad():
        output = denoise(model, sample, timestep, conditioning)
    positional, keywords = calls[0]
    assert positional == 0 and {adapter.sample_arg, adapter.timestep_arg} <= keywords
    assert (
        set(conditioning)
        <= keywords
        <= set(adapter.conditioning)
        | {
            adapter.sample_arg,
            adapter.timestep_arg,
            "return_dict",
            "img_ids",
            "txt_ids",
            "img_shapes",
            "added_cond_kwargs",
        }
    )
    assert output.shape == sample.shape and torch.isfinite(output).all()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_blocks_are_the_family_repeated_blocks(family):
    model = build_family(family)
    blocks = list(adapter_for(model).find_blocks(model))
    kinds = {type(module).__name__ for _, module in blocks}
    assert kinds == EXPECTED[family][1] and len(blocks) == EXPECTED[family][2]
    declared = getattr(model, "_repeated_blocks", None) or []
    assert set(declared) <= kinds | {"BasicTransformerBlock"}  # diffusers' own list where it has one


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_joint_block_output_is_the_image_stream(family):
    model = build_family(family)
    adapter = adapter_for(model)
    seen = {}
    name, block = next(adapter.find_blocks(model))
    block.register_forward_hook(lambda m, args, kwargs, out: seen.update(kw=kwargs, out=out), with_kwargs=True)
    sample, timestep, conditioning = adapter.example_inputs(model, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoise(model, sample, timestep, conditioning)
    image = seen["kw"]["hidden_states"]
    stream = adapter.block_output(block, seen["out"])
    assert stream.shape == image.shape and seen["out"][0].shape[1] != image.shape[1]  # the text stream differs


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "qwenimage", "sd-unet"])
def test_wrapped_attention_is_bit_identical_when_quantization_is_off(family):
    model = build_family(family)
    sample, timestep, conditioning = adapter_for(model).example_inputs(model, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = denoise(model, sample, timestep, conditioning)
    spec = QuantSpec("int8")
    wrapped = 0
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(wrap_processor(module.processor, spec, spec))
            wrapped += 1
    for _, processor in attention_processors(model):
        for quantizer in processor.quantizers():
            quantizer.enabled = False
    with torch.no_grad():
        again = denoise(model, sample, timestep, conditioning)
    assert wrapped > 0 and torch.equal(reference, again)


def test_quantized_joint_attention_runs_and_changes_the_output_a_little():
    model = family_model("sd3")
    calibration = family_inputs(model)
    options = dict(progress=False, wbits=8, abits=8)
    plain = diffquant.quantize(model, "naive", calibration, **options)
    matmuls = diffquant.quantize(model, "naive", calibration, attention_bits=8, softmax_bits=8, **options)
    processors = dict(attention_processors(matmuls.denoiser))
    kinds = {type(p.inner).__name__ for p in processors.values()}
    assert len(processors) == 2 and kinds == {"JointAttnProcessor2_0"}
    batch = next(calibration.batches(8))
    with torch.no_grad():
        from diffquant.calibration import call_denoiser

        a, b, ref = (call_denoiser(m.denoiser, batch) for m in (plain, matmuls, model))
    assert not torch.equal(a, b) and (b - ref).pow(2).sum() / ref.pow(2).sum() < 0.01


def test_nested_conditioning_saves_and_loads(tmp_path):
    model = family_model("sdxl-unet")
    calibration = family_inputs(model, per_step=2)
    assert set(calibration.conditioning["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    calibration.save(tmp_path / "calib")
    loaded = CalibrationSet.load(tmp_path / "calib")
    for key in ("text_embeds", "time_ids"):
        original = calibration.conditioning["added_cond_kwargs"][key]
        assert torch.equal(loaded.conditioning["added_cond_kwargs"][key], original)
    batch = next(loaded.batches(64))
    assert batch.conditioning["added_cond_kwargs"]["time_ids"].shape == (2, 6)


def test_unknown_family_gets_a_generic_adapter_or_one_clear_error():
    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, sample, timestep, context=None):
            return (self.proj(sample) * timestep[:, None],)

    adapter = adapter_for(Denoiser())
    assert (adapter.sample_arg, adapter.timestep_arg, adapter.conditioning) == ("sample", "timestep", ("context",))

    class Odd(nn.Module):
        def forward(self, a, b):
            return a

    with pytest.raises(DiffquantError, match=r"Model family 'Odd' has no diffquant adapter.*CONTRIBUTING"):
        adapter_for(Odd())


def test_model_without_schedule_infers_flow_matching_or_fails_clearly():
    assert family_model("sd3").scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ConfigError, match="no scheduler config"):
        DiffusionModel(build_family("unet"), ModelInfo("u", "unet", (1, 8, 8)))


def test_plain_dit_directory_loads_with_its_class_count(tmp_path):
    build_family("dit").save_pretrained(tmp_path / "dit")
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        diffquant.load(tmp_path / "dit")
    (tmp_path / "dit" / "scheduler").mkdir()
    (tmp_path / "dit" / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDPM_LINEAR_SCHEDULE))
    model = diffquant.load(tmp_path / "dit")
    assert model.info.num_classes == 10 and model.info.image_shape == (1, 8, 8)
    from diffquant.sampling import SamplerConfig, sample

    result = sample(model, 3, SamplerConfig("ddim", 2, guidance_scale=2.0), progress=False)
    assert result.images.shape == (3, 1, 8, 8) and result.labels.tolist() == [0, 1, 2]


def test_flow_model_samples_with_conditioning_and_guidance():
    from diffquant.sampling import SamplerConfig, sample

    model = family_model("sd3")
    generator = torch.Generator().manual_seed(0)
    conditioning = model.adapter.example_conditioning(model.denoiser, 2, generator)
    unconditional = {k: torch.zeros_like(v) for k, v in conditioning.items()}
    with pytest.raises(ConfigError, match="needs conditioning"):
        sample(model, 2, SamplerConfig("ddim", 2), progress=False)
    config = SamplerConfig("ddim", 3, guidance_scale=3.0)  # a flow model runs its flow scheduler
    first = sample(model, 2, config, conditioning=conditioning, unconditional=unconditional, progress=False)
    again = sample(model, 2, config, conditioning=conditioning, unconditional=unconditional, progress=False)
    assert first.images.shape == (2, 4, 8, 8) and torch.equal(first.images, again.images)


FAST_ROWS = [(family, "naive", "W8A8") for family in BUILDERS] + [
    ("sd3", "qdiffusion", "W4A8"),
    ("flux", "tfmq", "W8A8"),
    ("qwenimage", "edadm", "W4A8"),
    ("wan", "ptq4dm", "W4A8"),
]
SLOW_ROWS = [
    (family, method, setting)
    for family in BUILDERS
    for method in METHODS
    for setting in SETTINGS
    if (family, method, setting) not in FAST_ROWS
]


def _check_row(row: dict) -> None:
    # every family's layers are reached (TFMQ keeps its edge layers in fp, by design)
    assert row["quantized"] >= (row["total"] if row["method"] == "naive" else 0.85 * row["total"])
    assert row["rel_error"] < (0.05 if row["setting"] == "W8A8" else 0.5)
    assert row["reload_identical"]
    assert row["export_rel_error"] < 1e-3


@pytest.mark.parametrize(("family", "method", "setting"), FAST_ROWS)
def test_matrix_fast(family, method, setting, tmp_path):
    _check_row(matrix_row(family, method, setting, tmp_path / "q"))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method", "setting"), SLOW_ROWS)
def test_matrix_slow(family, method, setting, tmp_path):
    _check_row(matrix_row(family, method, setting, tmp_path / "q"))


def test_export_directory_checks_agreement_on_a_text_conditioned_family(tmp_path):
    from diffquant.runtime.deploy import export_directory

    model = family_model("flux")
    quantized = diffquant.quantize(model, "naive", family_inputs(model), progress=False, wbits=8, abits=8)
    diffquant.save(quantized, tmp_path / "q")
    report = export_directory(tmp_path / "q", tmp_path / "int8", "onednn")
    assert report["agreement"]["relative_mse"] < 1e-3
    deployed = diffquant.load(tmp_path / "int8")
    fresh = family_inputs(model, per_step=2, seed=7)
    from tests.family_models import outputs, relative_mse

    assert relative_mse(outputs(quantized, fresh), outputs(deployed, fresh)) < 1e-3


@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sana", "sd3", "flux"])
def test_svdquant_w4a4_runs_saves_and_exports_on_every_family(family, tmp_path, monkeypatch):
    import diffquant
    from diffquant.modules.structure import modulation_layers

    monkeypatch.setitem(SETTINGS, "W4A4", (4, 4))
    small = {"preset": "fast", "rank": 4, "smoothing_alphas": (0.5,), "calibration_samples": 16, "search_samples": 8}
    monkeypatch.setitem(TINY_OPTIONS, "svdquant", small)
    row = matrix_row(family, "svdquant", "W4A4", tmp_path / "q")
    assert row["reload_identical"] and row["export_rel_error"] < 1e-3 and row["rel_error"] < 0.5
    # the adaLN modulation of every transformer family is found and runs weight-only (W4A16)
    quantized = diffquant.load(tmp_path / "q")
    details = quantized.quantization["details"]
    assert set(details["weight_only_modulation"]) == set(modulation_layers(family_model(family).denoiser))
    assert bool(details["weight_only_modulation"]) == (family != "sdxl-unet")
    if family == "sana":  # its depthwise conv has no low-rank form: a plain 4-bit layer instead of a crash
        assert details["plain_grouped_convs"]


@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sd3", "flux"])
def test_svdquant_reconstructed_finds_the_blocks_and_trains_branches_on_every_family(family, tmp_path, monkeypatch):
    monkeypatch.setitem(SETTINGS, "W4A4", (4, 4))
    small = {"preset": "reconstructed", "rank": 4, "smoothing_alphas": (0.5,), "calibration_samples": 16}
    small |= {"search_samples": 8, "checkpoint_dir": str(tmp_path / "ckpt")}
    small["reconstruction"] = {"weight_iters": 4, "batch_size": 4, "float_lr": 1e-4}
    monkeypatch.setitem(TINY_OPTIONS, "svdquant", small)
    row = matrix_row(family, "svdquant", "W4A4", tmp_path / "q")
    assert row["reload_identical"] and row["export_rel_error"] < 1e-3 and row["rel_error"] < 0.5
    assert not any((tmp_path / "ckpt").iterdir())  # the finished run leaves no checkpoint


@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sd3", "flux"])
def test_dgq_reconstructed_and_mixdq_mixed_activations_run_on_every_text_family(family, tmp_path, monkeypatch):
    dgq = {"preset": "reconstructed", "groups": 4, "checkpoint_dir": str(tmp_path / "ckpt")}
    dgq["reconstruction"] = {"weight_iters": 4, "batch_size": 4}
    monkeypatch.setitem(TINY_OPTIONS, "dgq", dgq)
    row = matrix_row(family, "dgq", "W4A8", tmp_path / "dgq")
    assert row["reload_identical"] and row["rel_error"] < 0.5
    assert diffquant.load(tmp_path / "dgq").quantization["details"]["rounding"] == "adaround"
    assert not any((tmp_path / "ckpt").iterdir())  # the finished run leaves no checkpoint
    mixed = {"preset": "mixed-activations", "average_activation_bits": 6.0, "sensitivity_samples": 2}
    monkeypatch.setitem(TINY_OPTIONS, "mixdq", mixed)
    row = matrix_row(family, "mixdq", "W4A8", tmp_path / "mixdq")
    assert row["reload_identical"] and row["rel_error"] < 0.5
    details = diffquant.load(tmp_path / "mixdq").quantization["details"]
    assert set(details["activation_bits"].values()) <= {4, 8} and details["average_activation_bits"] <= 6.0


@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sd3", "flux", "wan"])
def test_bfloat16_compute_export_runs_every_family_near_float32(family):
    from diffquant.runtime.export import export_model
    from diffquant.runtime.kernels_int4 import bf16_matmul_supported
    from tests.family_models import outputs, relative_mse

    if not bf16_matmul_supported():
        pytest.skip("no bfloat16 matrix units on this CPU (the refusal is tested in test_runtime.py)")
    model = family_model(family)
    quantized = diffquant.quantize(model, "naive", family_inputs(model), progress=False, wbits=8, abits=8)
    fresh = family_inputs(model, per_step=2, seed=7)
    float32 = outputs(export_model(quantized, "onednn"), fresh)
    bfloat16 = outputs(export_model(quantized, "onednn", compute_dtype="bfloat16"), fresh)
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in bfloat16)
    # bfloat16 rounding (8 mantissa bits) around the same int8 kernels, with timesteps and positions kept float32
    assert 0 < relative_mse(float32, bfloat16) < 5e-3


@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sd3", "flux"])
def test_deploy_preset_runs_every_family_on_the_fused_int8_path(family):
    from diffquant.modules.attention import QuantAttnProcessor
    from diffquant.runtime.export import export_model
    from diffquant.runtime.kernels import OneDNNInt8Conv2d, OneDNNInt8Linear
    from tests.family_models import TINY_OPTIONS, outputs, relative_mse

    model = family_model(family)
    config = diffquant.methods.make_config(
        "qdiffusion", preset="deploy", wbits=8, abits=8, **TINY_OPTIONS["qdiffusion"]
    )
    quantized = diffquant.quantize(model, config, family_inputs(model), progress=False)
    deployed = export_model(quantized, "onednn")
    inner = deployed.denoiser.inner
    kernels = [m for m in inner.modules() if isinstance(m, (OneDNNInt8Linear, OneDNNInt8Conv2d))]
    # symmetric weights: no GEMM needs a zero-point correction; float attention: no quantized matmul
    assert kernels and all(m.input_sum_weight is None for m in kernels)
    assert not any(isinstance(m, QuantAttnProcessor) and m._active() for m in inner.modules())
    fresh = family_inputs(model, per_step=2, seed=7)
    assert relative_mse(outputs(quantized, fresh), outputs(deployed, fresh)) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl-unet", "pixart", "sd3", "flux"])
def test_inductor_backend_lowers_every_family_compiled(family):
    # the inductor backend's reference form, compiled with freezing: oneDNN int8 kernels on every family,
    # called by keyword through the clocked wrapper, agreeing with the simulation
    from torch.profiler import profile

    from diffquant.runtime.export import export_model
    from tests.family_models import outputs, relative_mse

    model = family_model(family)
    quantized = diffquant.quantize(model, "naive", family_inputs(model), progress=False, wbits=8, abits=8)
    deployed = export_model(quantized, "inductor", compile=True)
    fresh = family_inputs(model, per_step=2, seed=7)
    outputs(deployed, fresh)  # compiles
    with profile() as trace:
        candidate = outputs(deployed, fresh)
    lowered = sum(e.count for e in trace.key_averages() if e.key == "onednn::qlinear_pointwise")
    assert lowered > 0, family
    assert relative_mse(outputs(quantized, fresh), candidate) < 1e-3
