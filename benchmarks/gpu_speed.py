"""GPU speed of diffquant's CUDA kernels at real size: W8A8 on int8 (`torch._int_mm`) and on fp8 E4M3
(`torch._scaled_mm`) against bf16, eager and compiled, side by side in one run.

    python benchmarks/gpu_speed.py                                  # on a CUDA machine, every model
    python benchmarks/gpu_speed.py --models pixart --batches 2      # one model, the CFG batch
    python benchmarks/gpu_speed.py --tiny --device cpu --backend ...  # the code path on tiny models (tests)

On a 15-minute GPU lease (about 13 usable), one call measured PixArt and the SD UNet with four rows at
batch 2 in 155 s; torchao's int8 row alone took 252 s to build on PixArt. A next run that fits:
`--batches 2 --variants diffquant-int8 bf16-compiled --fuse-int8-epilogue --deadline 300` (then batch 1,
the MMDiT, or torchao with what is left); `--deadline` also stops starting new rows.

The models are realsize_speed.py's seeded random-weight instances (speed does not depend on trained
weights): an SD-1.5 `UNet2DConditionModel`, a PixArt-alpha-512 transformer and an SD3-style MMDiT stack.
Quantization is diffquant's `naive` W8A8 (per-channel weights, static per-tensor activations from a
synthetic calibration set, on the CPU), deployed with the `cuda` backend: linears run on the int8 or fp8
GEMM, convolutions in bf16 with their inputs on the calibrated grid (`kernels` in the results counts
which layer ran where), everything around them in bf16, compiled by inductor like the bf16 baseline.
Every row is timed interleaved with the others (median of `--repeats` synchronized calls) and has the
20-step sampling run (at the first of `--batches`), resident weight memory, the peak device memory of a
call and the relative error against an fp32 call on the same device, TF32 off for matmuls and convolutions
(the committed H200 run still had cuDNN's TF32 convolutions in its UNet reference). Nothing in CI needs a
GPU: the test runs this code path on the CPU through a CPU-placed subclass of the cuda backend.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import realsize_speed as realsize  # noqa: E402 - the shared model builders, beside this script

from diffquant.fileio import write_json, write_text  # noqa: E402
from diffquant.profiling import host_label, interleaved_medians  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu"
SECTION = Path(__file__).parent / "results" / "full" / "sections" / "gpu.md"
MODELS = ("pixart", "sd-unet", "mmdit")
VARIANTS = ("bf16-eager", "bf16-compiled", "diffquant-int8", "diffquant-fp8", "torchao-int8", "torchao-fp8")
BASELINE = "bf16-compiled"
# naive W8A8 on each GEMM: int grids for `_int_mm`, E4M3 (weights and static per-tensor inputs) for `_scaled_mm`
QUANT_OPTIONS = {
    "diffquant-int8": {"wbits": 8, "abits": 8},
    "diffquant-fp8": {"wbits": 8, "abits": 8, "weight_format": "e4m3", "activation_format": "e4m3"},
}

Inputs = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _on(device: torch.device, inputs: Inputs) -> Inputs:
    sample, timestep, conditioning = inputs
    return sample.to(device), timestep.to(device), {k: v.to(device) for k, v in conditioning.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# transformer blocks, each class compiled once and reused by every instance (regional compilation)
REPEATED_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock")
COMPILE_MODES = ("regional", "full", "none")


def compile_as(module: nn.Module, mode: str) -> nn.Module:
    """`module` compiled as `mode` says, without dynamic shapes; call what it returns. "full" wraps the
    whole model; "regional" compiles each repeated transformer block in place and returns the module (minutes
    less inductor time on a lent GPU at about the same speed: diffusers' `compile_repeated_blocks`), the same
    for every row; "none" leaves it eager."""
    if mode == "full":
        return torch.compile(module, dynamic=False)
    if mode == "regional":
        blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
        if not blocks:
            raise SystemExit(f"{type(module).__name__} has none of {', '.join(REPEATED_BLOCKS)}: use --compile full.")
        for block in blocks:
            block.compile(dynamic=False)
    return module


def _bf16_call(module: nn.Module, mode: str) -> Callable[..., torch.Tensor]:
    """Calls a bf16 module from float32 inputs."""
    runner = compile_as(module, mode)

    def call(sample, timestep, conditioning):
        cast = {k: v.to(torch.bfloat16) for k, v in conditioning.items()}
        return realsize._output(runner(sample.to(torch.bfloat16), timestep, **cast)).float()

    return call


def bf16_variant(fp32: nn.Module, mode: str) -> realsize.Variant:
    """The float baseline: a bf16 copy of the model."""
    module = copy.deepcopy(fp32).to(torch.bfloat16)
    return realsize.Variant(_bf16_call(module, mode), module)


def diffquant_variant(case: realsize.Case, args: argparse.Namespace, name: str) -> realsize.Variant:
    """diffquant's naive W8A8 (quantized on the CPU), deployed on `args.backend` with bf16 around the GEMMs."""
    import diffquant
    from diffquant.families import denoise
    from diffquant.runtime.export import export_model

    started = time.perf_counter()
    model = realsize._diffquant_model(case, args.tiny)
    config = diffquant.methods.make_config("naive", **QUANT_OPTIONS[name])
    quantized = diffquant.quantize(model, config, realsize._calibration(case, args.calibration), progress=False)
    deployed = export_model(quantized, args.backend, compile=args.compile == "full", compute_dtype=args.compute_dtype)
    if args.compile == "regional":
        compile_as(deployed.denoiser.inner, "regional")
    kernels = ", ".join(f"{k} x{v}" for k, v in deployed.quantization["kernels"].items())

    def call(sample, timestep, conditioning):
        return denoise(deployed.denoiser, sample, timestep, conditioning)

    return realsize.Variant(call, deployed.denoiser.inner, setup_s=time.perf_counter() - started, notes=[kernels])


def torchao_variant(fp32: nn.Module, args: argparse.Namespace, name: str) -> realsize.Variant:
    """The peer: torchao's dynamic W8A8 on a bf16 copy's linears (int8 per token, or fp8 per row), compiled."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as error:
        raise realsize.Skipped(f"torchao not installed: {error}; pip install 'diffquant[peers]'") from error
    started = time.perf_counter()
    module = copy.deepcopy(fp32).to(torch.bfloat16)
    if name == "torchao-int8":
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
    else:
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    notes = ["nn.Linear only, dynamic per-token activations"]
    return realsize.Variant(
        _bf16_call(module, args.compile), module, setup_s=time.perf_counter() - started, notes=notes
    )


def make_variant(name: str, case: realsize.Case, fp32: nn.Module, args: argparse.Namespace) -> realsize.Variant:
    if name.startswith("torchao"):
        return torchao_variant(fp32, args, name)
    if name == "bf16-eager":
        return bf16_variant(fp32, mode="none")
    if name == "bf16-compiled":
        return bf16_variant(fp32, mode=args.compile)
    return diffquant_variant(case, args, name)


@contextlib.contextmanager
def plain_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (both would round the fp32 reference to 10-bit mantissas)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _peak_call_mb(call: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    """Device memory a call adds at its peak (CUDA's allocator statistics; None elsewhere)."""
    if device.type != "cuda":
        call()
        return None
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench_model(
    name: str, args: argparse.Namespace, device: torch.device, clock: Callable[[], float]
) -> dict[str, Any]:
    case = realsize.build_case(name, args)
    print(f"\n== {case.name}: {case.description}, {case.parameters / 1e6:.1f} M [{clock():.0f} s]", flush=True)
    examples = {batch: _on(device, case.inputs(batch)) for batch in args.batches}
    rows: dict[str, dict[str, Any]] = {}
    variants: dict[str, realsize.Variant] = {}
    # the quantized variants first: they quantize on the CPU from the float model, which then moves
    fp32 = case.denoiser
    for variant_name in sorted(args.variants, key=lambda v: not v.startswith("diffquant")):
        if args.deadline is not None and clock() > args.deadline:
            rows[variant_name] = {"skipped": f"not built: the {args.deadline:.0f} s deadline had passed"}
            continue
        if not variant_name.startswith("diffquant"):
            fp32 = fp32.to(device)
        try:
            variant = make_variant(variant_name, case, fp32, args)
            started = time.perf_counter()
            with torch.no_grad():
                for example in examples.values():  # compiles once per batch here
                    variant.call(*example)
            _synchronize(device)
            variant.setup_s += time.perf_counter() - started
        except realsize.Skipped as reason:
            rows[variant_name] = {"skipped": f"skipped: {reason}"}
            print(f"  {variant_name}: skipped: {reason}", flush=True)
            continue
        except Exception as error:  # noqa: BLE001 - one broken variant must not stop the run
            rows[variant_name] = {"skipped": realsize.failure_cell(error)}
            print(f"  {variant_name}: failed: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()
            continue
        variants[variant_name] = variant
        rows[variant_name] = {"setup_s": round(variant.setup_s, 2), "notes": variant.notes}
        print(f"  ready: {variant_name} ({variant.setup_s:.1f} s) [{clock():.0f} s]", flush=True)
    fp32 = fp32.to(device)
    with torch.no_grad(), plain_float32():
        reference = realsize._output(fp32(*examples[args.batches[0]][:2], **examples[args.batches[0]][2]))
    for batch in args.batches:

        def timed(variant: realsize.Variant, inputs: Inputs = examples[batch]) -> Callable[[], None]:
            return lambda: (variant.call(*inputs), _synchronize(device))

        with torch.no_grad():
            medians = interleaved_medians({k: timed(v) for k, v in variants.items()}, args.repeats, warmup=2)
        for label, milliseconds in medians.items():
            rows[label].setdefault("call_ms", {})[str(batch)] = round(milliseconds, 3)
    if args.steps:
        loops = {}
        for label, variant in variants.items():
            loop = realsize.sampling_loop(variant, case, args.steps, device=str(device), batch=args.batches[0])
            loops[label] = lambda loop=loop: (loop(), _synchronize(device))
        with torch.no_grad():
            for label, milliseconds in interleaved_medians(loops, 3, warmup=1).items():
                rows[label][f"sampling_{args.steps}_steps_ms"] = round(milliseconds, 2)
    fp32_mb = realsize.resident_megabytes(fp32)
    for label, variant in variants.items():
        row = rows[label]
        row["resident_weights_mb"] = round(realsize.resident_megabytes(variant.resident), 1)
        row["resident_fraction_of_fp32"] = round(row["resident_weights_mb"] / fp32_mb, 4)
        first = examples[args.batches[0]]
        with torch.no_grad():
            row["call_peak_mb"] = _peak_call_mb(lambda v=variant, inputs=first: v.call(*inputs), device)
            output = variant.call(*first).float()[:, : reference.shape[1]]
        row["relative_error_vs_fp32"] = round(((output - reference).norm() / reference.norm()).item(), 5)
    baseline = rows.get(BASELINE, {}).get("call_ms")
    for row in rows.values():
        if baseline and "call_ms" in row:
            row[f"speedup_vs_{BASELINE}"] = {b: round(baseline[b] / ms, 3) for b, ms in row["call_ms"].items()}
    del variants, fp32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"description": case.description, "parameters": case.parameters, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    batches, steps = results["batches"], results["steps"]
    sampled = results.get("sampling_batch", batches[0])
    lines = [
        f"Device: {machine['device_name']} ({machine['device']}), torch {machine['torch']}, CUDA "
        f"{machine['cuda']}; host {machine['host']}; {'tiny instances' if results['tiny'] else 'real size'}; "
        f"ratios against {BASELINE} from the same interleaved run"
        + ("; int8 GEMMs fused with their dequantizing multiply." if results.get("fused_int8_epilogue") else "."),
        "",
    ]
    for name, model in results["models"].items():
        if "rows" not in model:
            lines += [f"### {name}: {model.get('skipped', 'not run')}", ""]
            continue
        lines += [f"### {name}: {model['description']}, {model['parameters'] / 1e6:.0f} M parameters", ""]
        head = [f"call ms (b{b})" for b in batches] + [f"x {BASELINE} (b{b})" for b in batches]
        lines.append(
            "| variant | " + " | ".join(head) + f" | {steps}-step run ms (b{sampled}) | resident MB | x fp32 memory "
            "| call peak MB | rel. error vs fp32 | setup s | kernels |"
        )
        lines.append("|---" * (len(head) + 8) + "|")
        for label, row in model["rows"].items():
            if "skipped" in row:
                lines.append(f"| {label} | {row['skipped']} |" + " |" * (len(head) + 6))
                continue
            cell = lambda value, fmt="{:.2f}": "-" if value is None else fmt.format(value)  # noqa: E731
            calls = [cell(row.get("call_ms", {}).get(str(b))) for b in batches]
            ratios = [cell(row.get(f"speedup_vs_{BASELINE}", {}).get(str(b)), "{:.2f}x") for b in batches]
            lines.append(
                f"| {label} | "
                + " | ".join(calls + ratios)
                + f" | {cell(row.get(f'sampling_{steps}_steps_ms'), '{:.0f}')}"
                + f" | {cell(row.get('resident_weights_mb'), '{:.0f}')}"
                + f" | {cell(row.get('resident_fraction_of_fp32'), '{:.3f}')}"
                + f" | {cell(row.get('call_peak_mb'), '{:.0f}')}"
                + f" | {cell(row.get('relative_error_vs_fp32'), '{:.4f}')} | {cell(row.get('setup_s'), '{:.0f}')}"
                + f" | {'; '.join(row.get('notes', []))} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_section(paths: list[Path], section: Path = SECTION) -> str:
    """The BENCHMARKS.md section from committed result files (one per card and run)."""
    parts = [
        "## GPU speed: diffquant's cuda backend at real size",
        "",
        "Seeded random-weight real-size models (as in the real-size CPU section) on a lent GPU: diffquant's naive "
        "W8A8 deployed with `--backend cuda` (linears on `torch._int_mm` int8 or `torch._scaled_mm` fp8 E4M3 with "
        "static per-tensor activations, convolutions in bf16 with their inputs on the calibrated grid, bf16 around "
        "them) against the same model in bf16, eager and compiled. Every row is compiled the same way (regional: "
        "each transformer block class once) and timed interleaved with the others. Regenerate with "
        "`python benchmarks/gpu_speed.py` on a CUDA machine, then `--section` on its JSON.",
        "",
    ]
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
            parts += [f"Run `{Path(path).name}`:", "", markdown(results), ""]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"--section: {path} is not a result file of this script ({error}); rerun it.") from None
    text = "\n".join(parts).rstrip() + "\n"
    write_text(section, text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batches", nargs="+", type=realsize.positive, default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="sampling-run length, at the first batch (0: skip it)")
    parser.add_argument("--repeats", type=realsize.positive, default=20)
    parser.add_argument("--calibration", type=realsize.positive, default=2, help="synthetic calibration samples")
    parser.add_argument(
        "--mmdit-layers", type=realsize.positive, default=24, help="joint blocks of the MMDiT (SD3: 24)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="cuda", help="diffquant runtime backend of the quantized rows")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument(
        "--fuse-int8-epilogue",
        action="store_true",
        help="let inductor fuse each int8 GEMM with its dequantizing multiply (force_fuse_int_mm_with_mul, CUDA)",
    )
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new model or row starts")
    parser.add_argument("--tiny", action="store_true", help="tiny instances: test the code path in seconds")
    parser.add_argument("--compile", default="regional", choices=COMPILE_MODES, help="how every row is compiled")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/gpu/<device name>)")
    parser.add_argument("--section", nargs="+", type=Path, metavar="JSON", help="only write the BENCHMARKS.md section")
    return parser.parse_args(argv)


def machine(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "host": host_label(),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.section:
        print(write_section(args.section))
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU here: run this on a GPU machine, or pass --tiny --device cpu for the code path.")
    # every row compiles the same block classes: one cache entry per row and shape, more than dynamo's default 8
    torch._dynamo.config.recompile_limit = 64
    started = time.perf_counter()
    clock = lambda: time.perf_counter() - started  # noqa: E731
    results: dict[str, Any] = {
        "machine": machine(device),
        "tiny": args.tiny,
        "batches": args.batches,
        "steps": args.steps,
        "sampling_batch": args.batches[0],
        "fused_int8_epilogue": args.fuse_int8_epilogue,
        "repeats": args.repeats,
        "models": {},
    }
    name_part = results["machine"]["device_name"].lower().replace(" ", "-")
    stem = args.out or RESULTS / ("tiny" if args.tiny else name_part)
    for name in args.models:
        if args.deadline is not None and clock() > args.deadline:
            results["models"][name] = {"skipped": f"not run: the {args.deadline:.0f} s deadline had passed"}
            continue
        # fused: one Triton kernel per int8 linear instead of the GEMM and an elementwise pass
        with inductor_config.patch(force_fuse_int_mm_with_mul=args.fuse_int8_epilogue):
            results["models"][name] = bench_model(name, args, device, clock)
        write_json(stem.with_suffix(".json"), results)  # after every model: a kill keeps the models done
    realsize.write_results(stem, results, markdown)
    print(f"[{clock():.0f} s]")
    return results


if __name__ == "__main__":
    main()
