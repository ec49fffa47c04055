"""Real-kernel speed, memory and size of quantized models against full precision, measured side by side.

    python benchmarks/runtime_speed.py                      # both shipped models, 1 thread
    python benchmarks/runtime_speed.py --threads 2 --sampling-images 64

Every ratio compares variants timed in one process, interleaved (A, B, C, A, B, C, ...), with the same
thread count; medians of `--repeats` calls. The baseline is fp32 under torch.compile with inductor
freezing (the strongest fp32 path), as in shared/docs/research/peers.md. Results go to
benchmarks/results/runtime.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

import diffquant
from diffquant.evaluation import psnr
from diffquant.modules import quant_layers
from diffquant.profiling import interleaved_medians, measure_resources
from diffquant.quant import step_context
from diffquant.reporting import directory_megabytes
from diffquant.runtime.export import export_model
from diffquant.sampling import SamplerConfig, sample

RESULTS = Path(__file__).parent / "results" / "runtime.json"


def model_inputs(model, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.info.image_shape), generator=generator)
    t = torch.full((batch,), 500)
    kwargs = {"class_labels": torch.arange(batch) % model.info.num_classes} if model.info.conditional else {}
    return x, t, kwargs


def resident_megabytes(module: torch.nn.Module) -> float:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def quantized_layer_sizes(quantized) -> dict[str, float]:
    """Bytes of the quantized layers' weights: fp32 vs packed codes (+ scales and zero-points)."""
    fp32 = packed = side = 0
    for _, layer in quant_layers(quantized.denoiser):
        count = math.prod(layer._frozen_shape)
        fp32 += 4 * count
        packed += (count * layer.weight_quantizer.spec.bits + 7) // 8
        side += 4 * (layer.weight_quantizer.scale.numel() + layer.weight_quantizer.zero_point.numel())
    return {
        "fp32_mb": fp32 / 1e6,
        "packed_mb": packed / 1e6,
        "scales_mb": side / 1e6,
        "ratio_codes": fp32 / packed,
        "ratio_with_scales": fp32 / (packed + side),
    }


def bench_model(name: str, args) -> dict:
    print(f"\n== {name}", flush=True)
    source = diffquant.load(name)
    x, t, kwargs = model_inputs(source, args.batch)
    config = diffquant.methods.make_config("naive", wbits=8, abits=8, calibration={"trajectories": 64})
    w8a8 = diffquant.quantize(source, config, progress=False)
    w4_config = diffquant.methods.make_config("naive", wbits=4, abits=None, calibration={"trajectories": 16})
    w4 = diffquant.quantize(source, w4_config, progress=False)
    work = Path(args.work) / Path(name).name
    diffquant.save(w8a8, work / "w8a8")
    diffquant.save(w4, work / "w4a16")

    inductor_config.freezing = True  # constant-folds and prepacks fp32 weights: the strongest baseline
    fp32_compiled = torch.compile(copy.deepcopy(source.denoiser))
    with torch.no_grad():
        fp32_compiled(x, t, **kwargs)
    inductor_config.freezing = False
    int8_eager = export_model(w8a8, "onednn", compile=False)
    int8_compiled = export_model(w8a8, "onednn", compile=True)
    w4_at_load = export_model(w4, "onednn", compile=True, weight_only_mode="at-load")
    w4_packed = export_model(w4, "onednn", compile=True, weight_only_mode="packed")
    w4_on_the_fly = export_model(w4, "onednn", compile=True, weight_only_mode="on-the-fly")
    w4_on_the_fly_eager = export_model(w4, "onednn", compile=False, weight_only_mode="on-the-fly")

    def call(module):
        def run():
            with torch.no_grad(), step_context(0, 500, 50):
                return module(x, t, **kwargs)

        return run

    variants = {
        "fp32 eager": call(source.denoiser),
        "fp32 compiled": call(fp32_compiled),
        "W8A8 fake-quant (simulation)": call(w8a8.denoiser),
        "W8A8 int8 eager": call(int8_eager.denoiser),
        "W8A8 int8 compiled": call(int8_compiled.denoiser),
        "W4A16 at-load compiled": call(w4_at_load.denoiser),
        "W4A16 packed compiled": call(w4_packed.denoiser),
        "W4A16 on-the-fly compiled": call(w4_on_the_fly.denoiser),
        "W4A16 on-the-fly eager": call(w4_on_the_fly_eager.denoiser),
    }
    medians = interleaved_medians(variants, args.repeats, warmup=2)
    base = medians["fp32 compiled"]
    memory = {}
    for label, module in [
        ("fp32 compiled", source.denoiser),
        ("W8A8 int8 compiled", int8_compiled.denoiser),
        ("W4A16 at-load compiled", w4_at_load.denoiser),
        ("W4A16 packed compiled", w4_packed.denoiser),
        ("W4A16 on-the-fly compiled", w4_on_the_fly.denoiser),
    ]:
        with measure_resources() as usage:
            variants[label]()
        memory[label] = {
            "resident_weights_mb": round(resident_megabytes(module), 3),
            "call_peak_increase_mb": round(usage.peak_increase_mb, 1),
        }
    for label, value in medians.items():
        print(f"  {label:30s} {value:8.1f} ms   speedup vs fp32 compiled {base / value:5.2f}x", flush=True)

    result = {
        "batch": args.batch,
        "kernels": int8_compiled.quantization["kernels"],
        "latency_ms": medians,
        "speedup_vs_fp32_compiled": {k: base / v for k, v in medians.items()},
        "memory": memory,
        "disk_mb": {
            "fp32": directory_megabytes(source.path),
            "w8a8": directory_megabytes(work / "w8a8"),
            "w4a16": directory_megabytes(work / "w4a16"),
        },
        "quantized_layers_w4": quantized_layer_sizes(w4),
        "quantized_layers_w8": quantized_layer_sizes(w8a8),
    }

    # agreement of the deployed model with the simulation, on the images it samples
    sampler = SamplerConfig("ddim", 50)
    fake_images = sample(w8a8, args.agreement_images, sampler, seed=1, progress=False).images
    real_images = sample(int8_eager, args.agreement_images, sampler, seed=1, progress=False).images
    fp_images = sample(source, args.agreement_images, sampler, seed=1, progress=False).images
    result["agreement"] = {
        "images": args.agreement_images,
        "psnr_real_vs_fake_db": psnr(real_images, fake_images).mean().item(),
        "psnr_fake_vs_fp32_db": psnr(fake_images, fp_images).mean().item(),
        "max_abs_pixel_difference_real_vs_fake": (real_images - fake_images).abs().max().item(),
    }
    print(
        f"  agreement: PSNR(int8 real vs fake-quant) {result['agreement']['psnr_real_vs_fake_db']:.1f} dB; "
        f"PSNR(fake-quant vs fp32) {result['agreement']['psnr_fake_vs_fp32_db']:.1f} dB",
        flush=True,
    )

    if args.sampling_images:
        runs = {}
        for label, model in [("fp32 compiled", copy.copy(source)), ("W8A8 int8 compiled", int8_compiled)]:
            if label == "fp32 compiled":
                model.denoiser = fp32_compiled
            runs[label] = model
        timings = {label: [] for label in runs}
        for _ in range(2):
            for label, model in runs.items():
                started = time.perf_counter()
                sample(model, args.sampling_images, sampler, seed=2, batch_size=args.sampling_images, progress=False)
                timings[label].append(time.perf_counter() - started)
        seconds = {label: min(values) for label, values in timings.items()}
        result["sampling"] = {
            "images": args.sampling_images,
            "scheduler": "ddim",
            "steps": 50,
            "seconds": seconds,
            "speedup": seconds["fp32 compiled"] / seconds["W8A8 int8 compiled"],
        }
        print(
            f"  sampling {args.sampling_images} images x 50 DDIM steps: fp32 {seconds['fp32 compiled']:.1f} s, "
            f"int8 {seconds['W8A8 int8 compiled']:.1f} s ({result['sampling']['speedup']:.2f}x)",
            flush=True,
        )
    sizes = result["quantized_layers_w4"]
    print(
        f"  disk: W4 quantized layers {sizes['ratio_codes']:.2f}x smaller than fp32 "
        f"({sizes['ratio_with_scales']:.2f}x with scales); directories fp32 {result['disk_mb']['fp32']:.2f} MB, "
        f"W8A8 {result['disk_mb']['w8a8']:.2f} MB, W4A16 {result['disk_mb']['w4a16']:.2f} MB",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist-unet", "fmnist-dit"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sampling-images", type=int, default=64)
    parser.add_argument("--agreement-images", type=int, default=64)
    parser.add_argument("--work", default="runs/bench-runtime")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "models": {name: bench_model(name, args) for name in args.models},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
