"""Wall time and peak memory of a whole calibration (recording the calibration set + the method), per method.

    python benchmarks/calibration_time.py                                  # W4A8 on the shipped UNet, 2 threads
    python benchmarks/calibration_time.py --methods qdiffusion --preset paper --setting W4A8

Run it on an otherwise idle machine: the times are the ones users see with `diffquant quantize`.
The `fast` presets are tuned so that a W4A8 calibration of the shipped UNet takes at most 10 minutes
on 2 CPU cores. Results go to benchmarks/results/calibration_time.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import diffquant
from diffquant.bench.matrix import SETTINGS
from diffquant.methods import make_config
from diffquant.profiling import measure_resources

RESULTS = Path(__file__).parent / "results" / "calibration_time.json"


def time_method(model: str, method: str, setting: str, preset: str | None) -> dict:
    wbits, abits = SETTINGS[setting]
    source = diffquant.load(model)
    options = {"preset": preset} if preset else {}
    config = make_config(method, wbits=wbits, abits=abits, **options)
    with measure_resources() as usage:
        started = time.perf_counter()
        calibration = diffquant.record_calibration(source, config, progress=False)
        recorded = time.perf_counter() - started
        quantized = diffquant.quantize(source, config, calibration, progress=False)
    return {
        "model": model,
        "method": method,
        "setting": setting,
        "preset": config.preset,
        "calibration_samples": len(calibration),
        "recording_s": recorded,
        "total_s": usage.wall_time_s,
        "peak_rss_mb": usage.peak_rss_mb,
        "method_s": quantized.quantization["calibration_wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-unet")
    parser.add_argument("--methods", nargs="+", default=["naive", "ptq4dm", "qdiffusion", "tfmq", "edadm"])
    parser.add_argument("--setting", default="W4A8", choices=sorted(SETTINGS))
    parser.add_argument("--preset", default=None, help="Method preset (default: each method's default, fast).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    runs = [run for run in previous["runs"] if not (run["model"] == args.model and run["setting"] == args.setting)]
    print(f"{'method':12s} {'preset':7s} {'samples':>8s} {'total':>9s} {'peak RSS':>10s}", flush=True)
    for method in args.methods:
        result = {**time_method(args.model, method, args.setting, args.preset), "machine": machine}
        runs.append(result)
        print(
            f"{method:12s} {result['preset'] or '-':7s} {result['calibration_samples']:8d} "
            f"{result['total_s'] / 60:7.1f} min {result['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"python": sys.version.split()[0], "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
