"""Real-size CPU speed suite: diffquant's deployed forms against fp32 and the peers, side by side.

    python benchmarks/realsize_speed.py                        # every model and variant, real size
    python benchmarks/realsize_speed.py --models sd-unet --batches 1 --variants fp32-compiled diffquant-w8a8
    python benchmarks/realsize_speed.py --tiny --no-compile    # the code path on tiny models (seconds)

Models are seeded random-weight instances (speed does not depend on trained weights) built from the
published configs: an SD-1.5 `UNet2DConditionModel` (860 M parameters, 64x64x4 latent, 77x768 text
states), a PixArt-alpha-512 `PixArtTransformer2DModel` (~610 M, 64x64x4 latent, patch 2, 120x4096
T5 states) and an SD3-style MMDiT stack (`SD3Transformer2DModel`, width 1536, `--mmdit-layers` joint
blocks). Every model is called by keyword through `KeywordDenoiser`, so PixArt/SD3 take the
`(sample, timestep, **conditioning)` convention diffquant's calibration and sampling use.

Variants, all timed interleaved in one process with the same threads (medians of `--repeats`):
fp32 eager; fp32 compiled (inductor, freezing); bf16 compiled (the reference a bf16 weight-only row
must be read against); diffquant W8A8 per `--methods` on the onednn backend, compiled (and on the
inductor backend: the same grids lowered by inductor's PT2E passes, `diffquant-w8a8-inductor*`; and on the
openvino backend: the same grids run by OpenVINO's runtime, `diffquant-w8a8-openvino*`); diffquant W4
weight-only (packed int4, decoded per call); PT2E + X86InductorQuantizer (static W8A8, compiled);
torchao int8 dynamic (Linear only, compiled); OpenVINO through NNCF int8. A variant that cannot run
here (a missing peer, a model diffquant cannot quantize yet) is recorded as `skipped: reason`.
Each row also has the one-call latency at every batch, a `--steps`-step sampling loop at batch 1,
resident weight memory, peak RSS increase of a call, disk size, and the relative error against fp32.
Writes JSON and a markdown table (`--out`). The suite sets glibc's malloc thresholds itself: low while it
builds (freed model copies go back to the OS, so the variants fit in RAM side by side), high while it times
(a call reuses freed heap pages instead of page-faulting fresh ones). Do not set `MALLOC_MMAP_THRESHOLD_`
for a run: at 128 KiB it slowed every PyTorch row 10-18 % and left OpenVINO, which pools its memory, as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

from diffquant.fileio import write_json, write_text
from diffquant.profiling import TIMING_MMAP_THRESHOLD, available_memory_mb, host_label, malloc_thresholds

RESULTS = Path(__file__).parent / "results" / "realsize"
MODELS = ("sd-unet", "pixart", "mmdit")
VARIANTS = (
    "fp32-eager",
    "fp32-compiled",
    "bf16-compiled",
    "diffquant-w8a8",
    "diffquant-w8a8-bf16",
    "diffquant-w8a8-inductor",
    "diffquant-w8a8-inductor-bf16",
    "diffquant-w8a8-openvino",
    "diffquant-w8a8-openvino-bf16",
    "diffquant-w4",
    "pt2e",
    "pt2e-bf16",
    "torchao",
    "openvino",
    "openvino-bf16",
)


class Skipped(Exception):
    """A variant that cannot run here; the message is the reason recorded in the results."""


class KeywordDenoiser(nn.Module):
    """Calls a diffusers denoiser by keyword from diffquant's (sample, timestep, **conditioning) call."""

    def __init__(self, inner: nn.Module, sample_name: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.sample_name = sample_name
        self.extra = extra or {}

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning):
        return self.inner(**{self.sample_name: sample}, timestep=timestep, **conditioning, **self.extra)


@dataclass
class Case:
    """One model of the suite: the keyword-called denoiser and how to make its inputs."""

    name: str
    denoiser: nn.Module
    latent: tuple[int, int, int]
    conditioning: dict[str, tuple[int, ...]]
    description: str
    parameters: int = 0

    def inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn((batch, *self.latent), generator=generator)
        conditioning = {k: torch.randn((batch, *shape), generator=generator) for k, shape in self.conditioning.items()}
        return sample, torch.full((batch,), 500.0), conditioning


def build_sd_unet(tiny: bool) -> Case:
    from diffusers import UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text = (7, 32)
    else:  # stable-diffusion-v1-5 unet/config.json
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text = (77, 768)
    size = unet.config.sample_size
    return Case(
        "sd-unet",
        KeywordDenoiser(unet.eval(), "sample"),
        (4, size, size),
        {"encoder_hidden_states": text},
        f"UNet2DConditionModel, SD-1.5 config, {size}x{size}x4 latent, {text[0]}x{text[1]} text",
    )


def build_pixart(tiny: bool) -> Case:
    from diffusers import PixArtTransformer2DModel

    heads, head_dim, layers, caption, size, tokens = (2, 16, 2, 32, 8, 7) if tiny else (16, 72, 28, 4096, 64, 120)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        caption_channels=caption,
        sample_size=size,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return Case(
        "pixart",
        KeywordDenoiser(model.eval(), "hidden_states", extra),
        (4, size, size),
        {"encoder_hidden_states": (tokens, caption)},
        f"PixArtTransformer2DModel, PixArt-alpha-512 config, {layers} blocks, {(size // 2) ** 2} tokens",
    )


def build_mmdit(tiny: bool, layers: int) -> Case:
    from diffusers import SD3Transformer2DModel

    heads, head_dim, joint, pooled, size, tokens = (2, 16, 32, 32, 8, 7) if tiny else (24, 64, 4096, 2048, 64, 154)
    model = SD3Transformer2DModel(
        sample_size=size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2 if tiny else layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled,
        pos_embed_max_size=size,
    )
    return Case(
        "mmdit",
        KeywordDenoiser(model.eval(), "hidden_states"),
        (16, size, size),
        {"encoder_hidden_states": (tokens, joint), "pooled_projections": (pooled,)},
        f"SD3Transformer2DModel (MMDiT), width {heads * head_dim}, {model.config.num_layers} joint blocks",
    )


def build_case(name: str, args) -> Case:
    torch.manual_seed(args.seed)
    case = {"sd-unet": lambda: build_sd_unet(args.tiny), "pixart": lambda: build_pixart(args.tiny)}.get(
        name, lambda: build_mmdit(args.tiny, args.mmdit_layers)
    )()
    case.parameters = sum(p.numel() for p in case.denoiser.parameters())
    return case


# --- variants -------------------------------------------------------------------------------------
@dataclass
class Variant:
    """A ready-to-call deployed form: `call(sample, timestep, conditioning)` returns the output tensor."""

    call: Callable[..., torch.Tensor]
    resident: nn.Module | None = None
    freeze: bool = False
    """compile with inductor freezing (float and peer graphs: constant-folded, prepacked weights)"""
    setup_s: float = 0.0
    disk_mb: float | None = None
    notes: list[str] = field(default_factory=list)


def _output(result) -> torch.Tensor:
    return result.sample if hasattr(result, "sample") else result[0] if isinstance(result, tuple) else result


def _module_call(module: nn.Module) -> Callable[..., torch.Tensor]:
    def call(sample, timestep, conditioning):
        return _output(module(sample, timestep, **conditioning))

    return call


def _compiled(module: nn.Module, compile: bool) -> nn.Module:
    return torch.compile(module) if compile else module


def _warm(variant: Variant, examples) -> None:
    """Call once per input shape (compilation happens here), with freezing as the variant wants it;
    diffquant's deployed graphs compile without it (the per-step clock must stay a live tensor)."""
    inductor_config.freezing = variant.freeze
    try:
        with torch.no_grad():
            for example in examples:
                variant.call(*example)
    finally:
        inductor_config.freezing = False


def _disk_mb(save: Callable[[Path], None]) -> float:
    from diffquant.reporting import directory_megabytes

    with tempfile.TemporaryDirectory() as scratch:
        save(Path(scratch))
        return directory_megabytes(scratch)


def _diffquant_model(case: Case, tiny: bool):
    from diffquant.families import adapter_for
    from diffquant.model import DDPM_LINEAR_SCHEDULE, DiffusionModel, ModelInfo

    # diffquant calls the bare diffusers model by keyword through its family adapter (no suite wrapper)
    denoiser = case.denoiser.inner
    # speed does not depend on the schedule: DDPM's linear betas where the family does not imply one
    schedule = None if adapter_for(denoiser).flow_matching else dict(DDPM_LINEAR_SCHEDULE)
    return DiffusionModel(denoiser, ModelInfo(case.name, "realsize", case.latent), schedule)


def _calibration(case: Case, count: int):
    """A synthetic calibration set (random latents and conditioning over a spread of timesteps): speed
    does not depend on where the ranges come from, and it avoids sampling a random-weight model."""
    from diffquant.calibration.dataset import CalibrationSet

    sample, _, conditioning = case.inputs(count, seed=1)
    steps = torch.arange(count)
    timesteps = torch.linspace(900, 100, count).round()
    return CalibrationSet(sample, timesteps, steps, conditioning, num_steps=count)


def make_diffquant(
    case: Case,
    args,
    method: str,
    wbits: int,
    abits: int | None,
    compute_dtype: str = "float32",
    backend: str = "onednn",
) -> Variant:
    import diffquant
    from diffquant.cli import parse_options
    from diffquant.families import denoise
    from diffquant.runtime.export import export_model

    started = time.perf_counter()
    model = _diffquant_model(case, args.tiny)
    name, _, options = method.partition(":")  # "naive:attention_bits=8,softmax_bits=8": the method's options
    try:
        values = parse_options(options.split(",") if options else [])
        config = diffquant.methods.make_config(name, wbits=wbits, abits=abits, **values)
        quantized = diffquant.quantize(model, config, _calibration(case, args.calibration), progress=False)
    except Exception as error:  # noqa: BLE001 - recorded as the reason this row is missing
        raise Skipped(f"diffquant could not quantize this model: {type(error).__name__}: {error}") from error
    deployed = export_model(quantized, backend, compile=args.compile, compute_dtype=compute_dtype)
    setup = time.perf_counter() - started
    disk = None
    try:
        disk = _disk_mb(lambda path: diffquant.save(quantized, path / "q"))
    except Exception as error:  # noqa: BLE001 - saving is a separate feature; keep the timing
        print(f"    (save failed: {type(error).__name__}: {error})", flush=True)
    kernels = ", ".join(f"{k} x{v}" for k, v in deployed.quantization["kernels"].items())

    def call(sample, timestep, conditioning):
        return denoise(deployed.denoiser, sample, timestep, conditioning)

    notes = [kernels]
    if backend == "openvino":
        notes.append("resident: the int8 codes plus OpenVINO's compiled graphs, one per batch size")
    return Variant(call, deployed.denoiser.inner, False, setup, disk, notes)


class _FloatTimestep(nn.Module):
    """PT2E annotates the integer timestep otherwise ('histogram_cpu not implemented for Long')."""

    def __init__(self, inner: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.inner, self.names = inner, names

    def forward(self, sample, timestep, *conditioning):
        return _output(self.inner(sample, timestep.float(), **dict(zip(self.names, conditioning, strict=True))))


class _Bf16Autocast(nn.Module):
    """PT2E's int8-mixed-bf16 mode: the converted graph compiled and run under CPU bf16 autocast."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _output(self.inner(*args)).float()


def make_pt2e(case: Case, args, example, bf16: bool = False) -> Variant:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as error:
        raise Skipped(f"torchao (PT2E) not installed: {error}; pip install 'diffquant[peers]'") from error
    started = time.perf_counter()
    names = list(example[2])
    calibration = _calibration(case, args.calibration)
    converted: dict[int, nn.Module] = {}
    for batch in args.batches:  # an exported graph is specialized to its batch size: one per batch
        sample, timestep, conditioning = case.inputs(batch)
        wrapper = _FloatTimestep(copy.deepcopy(case.denoiser), names)
        exported = torch.export.export(wrapper, (sample, timestep, *conditioning.values())).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for item in calibration.batches(1):
            repeat = lambda t, size=batch: t.expand(size, *t.shape[1:])  # noqa: E731
            prepared(repeat(item.sample), repeat(item.timesteps), *[repeat(item.conditioning[n]) for n in names])
        module = convert_pt2e(prepared)
        if bf16:  # the exported graph asserts its float32 dtypes, which autocast changes: drop the asserts
            for node in list(module.graph.nodes):
                if node.target == torch.ops.aten._assert_tensor_metadata.default:
                    module.graph.erase_node(node)
            module.recompile()
            module = _Bf16Autocast(module)
        converted[batch] = _compiled(module, args.compile)

    def call(sample, timestep, conditioning):
        return converted[sample.shape[0]](sample, timestep, *conditioning.values())

    mode = ", bf16 autocast (int8-mixed-bf16)" if bf16 else ""
    notes = [f"static per-tensor uint8 inputs, Linear+Conv2d (X86InductorQuantizer){mode}"]
    return Variant(call, None, True, time.perf_counter() - started, None, notes)


def make_torchao(case: Case, args) -> Variant:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:
        raise Skipped(f"torchao not installed: {error}; pip install 'diffquant[peers]'") from error
    started = time.perf_counter()
    module = copy.deepcopy(case.denoiser)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    compiled = _compiled(module, args.compile)
    return Variant(
        _module_call(compiled), module, True, time.perf_counter() - started, None, ["nn.Linear only, dynamic"]
    )


def fixed_size_position_tables(denoiser: nn.Module, sample: torch.Tensor) -> nn.Module:
    """SD3-style patch embeddings crop their position table with Python-int arithmetic that TorchScript
    tracing (OpenVINO's converter) turns into tensor ops, shifting NNCF's op addresses onto an int64 add
    ('fake_quantize... not implemented for Long'). For the one latent size timed, store the crop itself:
    the same numbers, no arithmetic left to trace."""
    from diffusers.models.embeddings import PatchEmbed

    for module in denoiser.modules():
        if isinstance(module, PatchEmbed) and module.pos_embed_max_size is not None:
            crop = module.cropped_pos_embed(*sample.shape[-2:])
            module.pos_embed_max_size = None
            module.height, module.width = (side // module.patch_size for side in sample.shape[-2:])
            module.register_buffer("pos_embed", crop.contiguous(), persistent=False)
    return denoiser


def make_openvino(case: Case, args, example, precision: str = "f32") -> Variant:
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        raise Skipped(f"openvino/nncf not installed ({error}); pip install 'diffquant[openvino]'") from error
    started = time.perf_counter()
    sample, timestep, conditioning = example
    names = list(conditioning)
    wrapper = _FloatTimestep(fixed_size_position_tables(copy.deepcopy(case.denoiser), sample), names)
    calibration = _calibration(case, args.calibration)
    items = [(b.sample, b.timesteps, *[b.conditioning[n] for n in names]) for b in calibration.batches(1)]
    quantized = nncf.quantize(wrapper, nncf.Dataset(items), subset_size=len(items))
    inputs = (sample, timestep, *conditioning.values())
    ov_model = ov.convert_model(quantized, example_input=inputs)
    # f32: float ops around the int8 ones in fp32; bf16: OpenVINO's own default on CPUs with AMX
    threads = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": precision}
    compiled = ov.Core().compile_model(ov_model, "CPU", threads)

    def call(sample, timestep, conditioning):
        return torch.from_numpy(
            compiled([sample.numpy(), timestep.numpy(), *[c.numpy() for c in conditioning.values()]])[0]
        )

    with tempfile.TemporaryDirectory() as scratch:
        ov.save_model(ov_model, Path(scratch) / "model.xml")
        from diffquant.reporting import directory_megabytes

        disk = directory_megabytes(scratch)
    notes = [f"NNCF int8 (static), OpenVINO CPU runtime, {precision} precision hint"]
    return Variant(call, None, False, time.perf_counter() - started, disk, notes)


def variant_labels(name: str, args) -> list[str]:
    """The rows a variant name stands for (diffquant-w8a8 gives one per method)."""
    if name == "diffquant-w8a8":
        return [f"diffquant W8A8 {method}" for method in args.methods]
    if name == "diffquant-w8a8-bf16":
        return [f"diffquant W8A8 {method} (bf16 compute)" for method in args.methods]
    if name == "diffquant-w8a8-inductor":  # the inductor backend: our grids lowered by inductor as PT2E's are
        return [f"diffquant W8A8 {method} [inductor]" for method in args.methods]
    if name == "diffquant-w8a8-inductor-bf16":
        return [f"diffquant W8A8 {method} [inductor] (bf16 compute)" for method in args.methods]
    if name == "diffquant-w8a8-openvino":  # the openvino backend: our grids on OpenVINO's runtime
        return [f"diffquant W8A8 {method} [openvino]" for method in args.methods]
    if name == "diffquant-w8a8-openvino-bf16":
        return [f"diffquant W8A8 {method} [openvino] (bf16 compute)" for method in args.methods]
    if name == "diffquant-w4":
        return ["diffquant W4 weight-only (packed)"]
    return [name]


def make_variant(name: str, label: str, case: Case, args, example) -> Variant:
    if name == "fp32-eager":
        return Variant(_module_call(case.denoiser), case.denoiser)
    if name == "fp32-compiled":  # compiles the eager module itself: a second fp32 copy would not fit in RAM
        started = time.perf_counter()
        compiled = _compiled(case.denoiser, args.compile)
        return Variant(_module_call(compiled), case.denoiser, True, time.perf_counter() - started)
    if name == "bf16-compiled":
        module = copy.deepcopy(case.denoiser).to(torch.bfloat16)
        compiled = _compiled(module, args.compile)

        def call(sample, timestep, conditioning):
            cast = {k: v.to(torch.bfloat16) for k, v in conditioning.items()}
            return _output(compiled(sample.to(torch.bfloat16), timestep, **cast)).float()

        return Variant(call, module, True)
    if name.startswith("diffquant-w8a8"):  # labels read "diffquant W8A8 <method> ..."
        compute_dtype = "bfloat16" if name.endswith("-bf16") else "float32"
        backend = next((b for b in ("inductor", "openvino") if f"-{b}" in name), "onednn")
        return make_diffquant(case, args, label.split(" ")[2], 8, 8, compute_dtype=compute_dtype, backend=backend)
    if name == "diffquant-w4":
        return make_diffquant(case, args, "naive", 4, None)
    if name in ("pt2e", "pt2e-bf16"):
        return make_pt2e(case, args, example, bf16=name == "pt2e-bf16")
    if name == "torchao":
        return make_torchao(case, args)
    if name in ("openvino", "openvino-bf16"):
        return make_openvino(case, args, example, "bf16" if name == "openvino-bf16" else "f32")
    raise SystemExit(f"unknown variant {name}; choose from {', '.join(VARIANTS)}")


def failure_cell(error: Exception) -> str:
    """A variant's failure as one short line: it goes into a markdown table cell."""
    return f"failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}"


def positive(text: str) -> int:
    """argparse type of the benchmarks' counts (threads, repeats): one line for 0 or less."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- measuring ------------------------------------------------------------------------------------
def release_memory() -> float:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and the
    real-size variants only fit in RAM side by side if the copies made while building them are returned).
    Returns the process's resident MB."""
    import ctypes
    import gc
    import resource

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    statm = Path("/proc/self/statm")
    if statm.exists():  # current resident pages (Linux); elsewhere the peak is the best there is
        return int(statm.read_text().split()[1]) * resource.getpagesize() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _looped(label: str, args) -> bool:
    """Whether a row gets the whole sampling run (`--loop-variants`; a variant name covers its rows)."""
    chosen = args.loop_variants
    return chosen is None or any(label in variant_labels(name, args) for name in chosen)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its inner tensors, since
    its own dtype is the nominal float one."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def resident_megabytes(module: nn.Module | None) -> float | None:
    """The module's tensors, plus what a runner that compiled its own graphs holds (openvino backend)."""
    if module is None:
        return None
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    compiled = sum(getattr(m, "compiled_bytes", 0) for m in module.modules())
    return (sum(tensor_bytes(t) for t in tensors.values()) + compiled) / 2**20


def sampling_loop(
    variant: Variant, case: Case, steps: int, device: str = "cpu", batch: int = 1
) -> Callable[[], torch.Tensor]:
    """A `steps`-step DDIM-like loop (one denoiser call per step at `batch`; the update is negligible)."""
    sample, _, conditioning = case.inputs(batch, seed=3)
    sample, conditioning = sample.to(device), {k: v.to(device) for k, v in conditioning.items()}
    timesteps = torch.linspace(999, 0, steps, device=device).round()

    def run():
        x = sample
        for t in timesteps:
            x = x - 0.02 * variant.call(x, t.expand(batch), conditioning)[:, : x.shape[1]]
        return x

    return run


# extra memory a peer takes while it builds, in fp32 model sizes (at real size PT2E kept 3 copies for two
# batch sizes, and OpenVINO's trace + conversion of PixArt was OOM-killed with 2.5 copies free)
BUILD_COPIES = {"pt2e": 4.0, "pt2e-bf16": 4.0, "openvino": 3.0, "openvino-bf16": 3.0, "torchao": 2.0}


def check_memory_for(variant_name: str, case: Case) -> None:
    """Skip a peer with a note when building it beside the variants already built would not fit in RAM:
    the kernel's OOM killer would otherwise end the whole run and every row timed so far."""
    copies = BUILD_COPIES.get(variant_name)
    available = available_memory_mb()
    if copies is None or available is None:
        return
    needed = copies * case.parameters * 4 / 2**20
    if available < needed:
        raise Skipped(
            f"not enough memory to build it beside the variants already built ({available:.0f} MB available, "
            f"about {needed:.0f} MB needed); time it in its own run: --variants fp32-compiled {variant_name}"
        )


# glibc malloc thresholds (bytes) while variants are built (freed copies go back to the OS at once, so they
# fit in RAM side by side) and while they are timed (freed pages are reused: no page faults per call)
BUILD_MALLOC = (128 * 2**10, 128 * 2**10)
TIMING_MALLOC = (TIMING_MMAP_THRESHOLD, 2**31 - 1)


def bench_case(name: str, args) -> dict[str, Any]:
    """Build every variant of one model and time them side by side (glibc's thresholds low while building)."""
    with malloc_thresholds(*BUILD_MALLOC):
        return _bench_case(name, args)


def _bench_case(name: str, args) -> dict[str, Any]:
    from diffquant.profiling import interleaved_medians, measure_resources

    case = build_case(name, args)
    print(f"\n== {case.name}: {case.description}, {case.parameters / 1e6:.1f} M parameters", flush=True)
    examples = {batch: case.inputs(batch) for batch in args.batches}
    with torch.no_grad():
        reference = _output(case.denoiser(examples[1][0], examples[1][1], **examples[1][2])) if 1 in examples else None
    rows: dict[str, dict[str, Any]] = {}
    variants: dict[str, Variant] = {}
    for variant_name in args.variants:
        for label in variant_labels(variant_name, args):
            try:
                check_memory_for(variant_name, case)
                variant = make_variant(variant_name, label, case, args, examples[args.batches[0]])
                started = time.perf_counter()
                _warm(variant, list(examples.values()))
                variant.setup_s += time.perf_counter() - started
            except Skipped as reason:
                rows[label] = {"skipped": f"skipped: {reason}"}
                print(f"  {label}: skipped: {reason}", flush=True)
                continue
            except Exception as error:  # noqa: BLE001 - one broken peer must not stop the suite
                rows[label] = {"skipped": failure_cell(error)}
                print(f"  {label}: failed: {type(error).__name__}: {error}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                continue
            variants[label] = variant
            rows[label] = {"setup_s": round(variant.setup_s, 2), "notes": variant.notes, "disk_mb": variant.disk_mb}
            print(f"  ready: {label} ({variant.setup_s:.1f} s, process RSS {release_memory():.0f} MB)", flush=True)
    release_memory()
    # timed with freed pages reused (no page faults per call); the build thresholds come back for the peaks
    with malloc_thresholds(*TIMING_MALLOC, restore=BUILD_MALLOC) as reused_pages:
        for batch in args.batches:
            calls = {label: (lambda v=v, inputs=examples[batch]: v.call(*inputs)) for label, v in variants.items()}
            with torch.no_grad():
                medians = interleaved_medians(calls, args.repeats)
            for label, milliseconds in medians.items():
                rows[label].setdefault("call_s", {})[str(batch)] = milliseconds / 1000
        if args.steps and 1 in args.batches:
            looped = {label: v for label, v in variants.items() if _looped(label, args)}
            loops = {label: sampling_loop(v, case, args.steps) for label, v in looped.items()}
            with torch.no_grad():
                medians = interleaved_medians(loops, 1)
            for label, milliseconds in medians.items():
                rows[label][f"sampling_{args.steps}_steps_s"] = milliseconds / 1000
    release_memory()
    for label, variant in variants.items():
        row = rows[label]
        row["resident_weights_mb"] = resident_megabytes(variant.resident)
        sample, timestep, conditioning = examples[args.batches[0]]
        with measure_resources() as usage, torch.no_grad():
            output = variant.call(sample, timestep, conditioning)
        row["call_peak_increase_mb"] = round(usage.peak_increase_mb, 1)
        if reference is not None and args.batches[0] == 1:
            output = output.float()[:, : reference.shape[1]]
            row["relative_error_vs_fp32"] = ((output - reference).norm() / reference.norm()).item()
    fp32_mb = resident_megabytes(case.denoiser)
    baseline = rows.get("fp32-compiled", {}).get("call_s") or rows.get("fp32-eager", {}).get("call_s")
    for row in rows.values():
        if baseline and "call_s" in row:
            row["speedup_vs_fp32"] = {b: baseline[b] / s for b, s in row["call_s"].items()}
        if row.get("resident_weights_mb") is not None:
            row["resident_fraction_of_fp32"] = row["resident_weights_mb"] / fp32_mb
    return {
        "description": case.description,
        "parameters": case.parameters,
        "baseline": "fp32-compiled" if rows.get("fp32-compiled", {}).get("call_s") else "fp32-eager",
        # per-call page faults move every PyTorch row (not OpenVINO's, which pools its memory)
        "malloc_while_timing": "glibc: 1 GiB mmap / 2 GiB trim thresholds" if reused_pages else "allocator defaults",
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['threads']} thread(s), torch {machine['torch']}; "
        f"{'tiny instances' if results['tiny'] else 'real size'}; ratios are against each model's "
        "baseline from the same interleaved run.",
        "",
    ]
    loop_key = f"sampling_{results['steps']}_steps_s"
    for name, model in results["models"].items():
        batches = results["batches"]
        lines += [f"### {name}: {model['description']}, {model['parameters'] / 1e6:.0f} M parameters", ""]
        hosts = {row["run"]: row["host"] for row in model["rows"].values() if "run" in row}
        if hosts:  # merged runs (a section): each row's run, and each run's host
            listed = "; ".join(f"run {run}: {host}" for run, host in sorted(hosts.items()))
            lines += [f"Hosts: {listed}.", ""]
        run_head = " run |" if hosts else ""
        head = [f"call s (b{b})" for b in batches] + [f"x {model['baseline']} (b{b})" for b in batches]
        lines.append(
            "| variant | " + " | ".join(head) + f" | {results['steps']}-step run s | resident MB | x fp32 memory "
            "| call peak +MB | disk MB | rel. error vs fp32 | setup s | notes |" + run_head
        )
        lines.append("|---" * (len(head) + 9 + bool(hosts)) + "|")
        for label, row in model["rows"].items():
            run_cell = f" {row['run']} |" if hosts else ""
            if "skipped" in row:
                reason = " ".join(row["skipped"].split())  # one table line (older results kept raw newlines)
                lines.append(f"| {label} | {reason} |" + " |" * (len(head) + 7) + run_cell)
                continue
            cell = lambda value, fmt="{:.2f}": "-" if value is None else fmt.format(value)  # noqa: E731
            calls = [cell(row.get("call_s", {}).get(str(b))) for b in batches]
            ratios = [cell(row.get("speedup_vs_fp32", {}).get(str(b)), "{:.2f}x") for b in batches]
            lines.append(
                f"| {label} | "
                + " | ".join(calls + ratios)
                + f" | {cell(row.get(loop_key))} | {cell(row.get('resident_weights_mb'), '{:.0f}')}"
                + f" | {cell(row.get('resident_fraction_of_fp32'), '{:.3f}')}"
                + f" | {cell(row.get('call_peak_increase_mb'), '{:.0f}')}"
                + f" | {cell(row.get('disk_mb'), '{:.0f}')} | {cell(row.get('relative_error_vs_fp32'), '{:.4f}')}"
                + f" | {cell(row.get('setup_s'), '{:.0f}')} | {'; '.join(row.get('notes', []))} |"
                + run_cell
            )
        lines.append("")
    return "\n".join(lines)


# --- the BENCHMARKS.md section ------------------------------------------------------------------
SECTION = Path(__file__).parent / "results" / "full" / "sections" / "realsize.md"
PEERS = ("pt2e", "pt2e-bf16", "torchao", "openvino", "openvino-bf16")
W8A8_TARGET = 2.5


def _result_file(path: Path) -> dict[str, Any]:
    """One run's results, or one clear error naming the file and what to do."""
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload.get("models"), dict) or "batches" not in payload:
            raise ValueError("no 'models'/'batches' entries")
    except (OSError, ValueError, AttributeError) as error:
        raise SystemExit(
            f"--section: {path} is not a result file of this script ({type(error).__name__}: {error}); "
            "pass the .json files a run wrote with --out, or rerun that model."
        ) from None
    return payload


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One results dict from several runs (a model may be timed in more than one process when its variants
    do not fit in RAM together; each run has its own fp32 baseline, so a row's ratios stay within its run,
    and a label repeated by a later run gets the suffix "(run N)")."""
    payloads = [_result_file(Path(path)) for path in paths]
    merged = {**payloads[0], "models": {}, "batches": sorted({b for p in payloads for b in p["batches"]})}
    for payload in payloads:
        host = payload["machine"].get("host") or "host not recorded"
        for name, model in payload["models"].items():
            target = merged["models"].setdefault(name, {**model, "rows": {}, "runs": 0})
            target["runs"] += 1
            for label, row in model["rows"].items():
                key = label if label not in target["rows"] else f"{label} (run {target['runs']})"
                target["rows"][key] = {**row, "run": target["runs"], "host": host}
    return merged


def _speed(row: dict[str, Any], batch: int) -> float | None:
    return row.get("speedup_vs_fp32", {}).get(str(batch))


def headline(results: dict[str, Any]) -> list[str]:
    """Per model, batch and host: diffquant's best W8A8 against fp32 compiled and the best peer; W4 memory."""
    lines = []
    for name, model in results["models"].items():
        hosts = list(dict.fromkeys(row.get("host", "host not recorded") for row in model["rows"].values()))
        for host in hosts:
            rows = {k: r for k, r in model["rows"].items() if r.get("host", "host not recorded") == host}
            where = f", {host}" if len(hosts) > 1 else ""
            lines += _headline_lines(f"{name}{where}", rows, results["batches"])
    return lines


def _headline_lines(title: str, rows: dict[str, dict[str, Any]], batches: list[int]) -> list[str]:
    """The headline of one model on one host; peers compare directly only within the run that timed ours."""
    lines = []
    for batch in batches:
        ours = {k: _speed(r, batch) for k, r in rows.items() if k.startswith("diffquant W8A8") and _speed(r, batch)}
        peers = {k: _speed(r, batch) for k, r in rows.items() if k.split(" (run")[0] in PEERS and _speed(r, batch)}
        if not ours:
            continue
        # the headline is a head-to-head: our best in a run that also timed a peer, where there is one
        peer_runs = {rows[k].get("run") for k in peers}
        head_to_head = {k: v for k, v in ours.items() if rows[k].get("run") in peer_runs} or ours
        best, best_speed = max(head_to_head.items(), key=lambda item: item[1])
        text = f"- **{title}, batch {batch}**: {best} {best_speed:.2f}x fp32 compiled (target {W8A8_TARGET}x)"
        run = rows[best].get("run")  # peers compared directly only within the run that timed ours
        unpaired = max((v for k, v in ours.items() if k not in head_to_head), default=None)
        if unpaired and unpaired > best_speed:
            text += f" ({unpaired:.2f}x in a run without a peer)"
        others = {k: v for k, v in peers.items() if rows[k].get("run") != run}
        peers = {k: v for k, v in peers.items() if rows[k].get("run") == run}
        if peers:
            peer, peer_speed = max(peers.items(), key=lambda item: item[1])
            text += f"; best peer {peer} {peer_speed:.2f}x, so diffquant runs at {best_speed / peer_speed:.2f}x it"
        if others:  # timed in another process: only their own ratios compare, and ours in that run if any
            listed = []
            for key, speed in sorted(others.items()):
                same_run = [v for k, v in ours.items() if rows[k].get("run") == rows[key].get("run")]
                mine = f" against diffquant's {max(same_run):.2f}x there" if same_run else ""
                listed.append(f"{key.split(' (run')[0]} {speed:.2f}x{mine}")
            text += f" (in another run against its own fp32 compiled: {', '.join(listed)})"
        bf16 = next((_speed(r, batch) for k, r in rows.items() if k.startswith("bf16-compiled")), None)
        if bf16:
            text += f"; bf16 compiled {bf16:.2f}x"
        # a later run's row of the same label carries " (run N)"
        w4_rows = [r for k, r in rows.items() if k.split(" (run")[0] == "diffquant W4 weight-only (packed)"]
        w4 = next((r for r in w4_rows if _speed(r, batch)), {})
        if _speed(w4, batch) and batch == 1:
            text += (
                f". W4 weight-only {_speed(w4, batch):.2f}x fp32 compiled, resident weights "
                f"{w4.get('resident_fraction_of_fp32', float('nan')):.3f} of fp32"
            )
        lines.append(text + ".")
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: every variant's speed against fp32 compiled, per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.8), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        rows = {k: r for k, r in results["models"][name]["rows"].items() if "speedup_vs_fp32" in r}
        labels = list(rows)
        width = 0.8 / len(results["batches"])
        for index, batch in enumerate(results["batches"]):
            values = [_speed(rows[label], batch) or 0.0 for label in labels]
            positions = [i + (index - (len(results["batches"]) - 1) / 2) * width for i in range(len(labels))]
            axis.barh(positions, values, height=width, label=f"batch {batch}")
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.axvline(W8A8_TARGET, color="red", linestyle="--", linewidth=0.8, label=f"W8A8 target {W8A8_TARGET}x")
        axis.set_yticks(range(len(labels)), [label.replace("diffquant ", "dq ") for label in labels], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"speed vs {results['models'][name]['baseline']} of the row's own run")
        axis.set_title(f"{name} ({results['models'][name]['parameters'] / 1e6:.0f} M)", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_section(paths: list[Path], section: Path = SECTION, out_dir: Path = RESULTS) -> str:
    """Merge per-model result files into OUT_DIR/real.json, a plot and the BENCHMARKS.md companion section."""
    results = merge_results(paths)
    figure = out_dir / "speedup.png"
    plot(results, figure)
    write_json(out_dir / "real.json", results)
    link = Path(os.path.relpath(figure.resolve(), Path.cwd().resolve())).as_posix()
    text = "\n".join(
        [
            "## Real-size CPU speed (seeded random weights, batch 1 and 2)",
            "",
            "Denoisers at the sizes people run (`python benchmarks/realsize_speed.py`, "
            f"{results['repeats']} repeats, medians of interleaved calls; a model whose variants do not fit in RAM "
            "together is timed in several processes, each with its own fp32-compiled baseline, and a ratio is only "
            "read against its own run's baseline); W8A8 rows are "
            "diffquant's deployed form (oneDNN int8, compiled; `[inductor]`: lowered by inductor as PT2E's graphs are; "
            "`[openvino]`: our grids run by OpenVINO's runtime, `:attention_bits=8` also quantizing Q, K and V), "
            "W4 keeps packed int4 weights. "
            f"Results: `{Path(os.path.relpath(out_dir.resolve(), Path.cwd().resolve())).as_posix()}/real.json`. "
            "Runs before those named `*-malloc-*` set `MALLOC_MMAP_THRESHOLD_=131072` for the whole process, which "
            "slowed the PyTorch rows (not OpenVINO's) by 10-18 % through page faults; the suite now sets glibc's "
            "thresholds itself (`runs/log.txt`).",
            "",
            *headline(results),
            "",
            f"![real-size speed]({link})",
            "",
            markdown(results),
        ]
    )
    write_text(section, text.strip() + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["naive"],
        help="diffquant methods for the W8A8 rows, each optionally with options: naive:attention_bits=8,softmax_bits=8",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="sampling-loop length (0: skip the loop)")
    parser.add_argument(
        "--loop-variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help="variants that get the sampling run (default: all; at real size each run is 20 denoiser calls)",
    )
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--calibration", type=positive, default=4, help="synthetic calibration samples")
    parser.add_argument("--mmdit-layers", type=positive, default=6, help="joint blocks in the MMDiT stack (SD3: 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny instances: test the code path in seconds")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile everywhere")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/realsize/<real|tiny>)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--section",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only merge these per-model result files into real.json, a plot and the BENCHMARKS.md section",
    )
    args = parser.parse_args(argv)
    if 1 not in args.batches:
        args.batches = [1, *args.batches]  # the error and the sampling loop are measured at batch 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.section:
        print(write_section(args.section))
        return merge_results(args.section)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "host": host_label(),  # AMX or its absence moves every ratio
            "threads": args.threads,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "tiny": args.tiny,
        "compiled": args.compile,
        "batches": args.batches,
        "steps": args.steps,
        "repeats": args.repeats,
        "models": {name: bench_case(name, args) for name in args.models},
    }
    write_results(Path(args.out) if args.out else RESULTS / ("tiny" if args.tiny else "real"), results, markdown)
    return results


def write_results(stem: Path, results: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """A run's JSON and markdown table next to each other (atomic: a kill leaves the last complete files)."""
    write_json(stem.with_suffix(".json"), results)
    write_text(stem.with_suffix(".md"), render(results) + "\n")
    print("\n" + render(results))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
