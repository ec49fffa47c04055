"""GGUF rows: the same Q4_0 file type, rounded to nearest (ggml's converter) or by our methods.

    python benchmarks/gguf_rows.py                          # both shipped models, smoke protocol
    python benchmarks/gguf_rows.py --models fmnist-dit --protocol quick

Every row is a GGUF file read back with diffquant's own GGUF reader/dequantizer: the shipped models are
diffusers UNet2DModel / DiTTransformer2DModel, which diffusers cannot load from a single file (its
`from_single_file` knows SD/SDXL UNets, SD3, Flux and a few other families), so the files use the
diffusers state-dict layout. Weights only (activations stay float: GGUF holds no activation scales).

Rows per model:
* `rtn`     - the float model rounded to nearest by ggml's rule (bit-exact with the gguf package), as a
              GGUF converter does; linear and conv rows of whole 32-blocks become Q4_0.
* `<method>`- the method calibrated with `weight_grid=q4_0` (its codes on the same Q4_0 grid), exported
              with its own codes (no re-rounding).
PSNR/SSIM are against the fp32 model's samples from the same seeds; FID on the shipped feature network.
Results go to benchmarks/results/gguf_rows.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffquant
from diffquant.evaluation.protocol import Scorer, agreement, get_protocol, protocol_samples
from diffquant.methods import make_config
from diffquant.runtime.gguf import export_gguf, load_gguf_denoiser
from diffquant.zoo.registry import DiffusionModel

RESULTS = Path(__file__).parent / "results" / "gguf_rows.json"


def _score(model: DiffusionModel, protocol, scorer: Scorer, reference: torch.Tensor | None) -> dict:
    result = protocol_samples(model, protocol, progress=False)
    metrics = scorer.score(result.images, result.labels, protocol.precision_recall_k)
    if reference is not None:
        metrics.update(agreement(result.images, reference))
    return {k: round(float(v), 4) for k, v in metrics.items()}, result.images


def _gguf_row(source: DiffusionModel, model, path: Path, float_type: str | None, protocol, scorer, reference) -> dict:
    report = export_gguf(model, path, float_type=float_type, layout="diffusers").to_json()
    read_back = DiffusionModel(load_gguf_denoiser(path), source.info, source.scheduler_config)
    metrics, _ = _score(read_back, protocol, scorer, reference)
    return {"file_bytes": report["file_bytes"], "types": report["types"], "ours": report["ours"], **metrics}


def run(models: list[str], methods: list[str], grid: str, protocol_name: str, preset: str | None) -> dict:
    protocol = get_protocol(protocol_name)
    scorer = Scorer.load(protocol.reference)
    rows = []
    for name in models:
        source = diffquant.load(name)
        fp32, reference = _score(source, protocol, scorer, None)
        rows.append({"model": name, "row": "fp32", **fp32})
        print(json.dumps(rows[-1]), flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            row = _gguf_row(source, source, Path(scratch) / "rtn.gguf", grid, protocol, scorer, reference)
            rows.append({"model": name, "row": f"rtn {grid}", **row})
            print(json.dumps(rows[-1]), flush=True)
            for method in methods:
                bits = int(grid[1])
                config = make_config(method, preset, wbits=bits, abits=None, weight_grid=grid)
                started = time.perf_counter()
                quantized = diffquant.quantize(source, config, progress=False)
                seconds = time.perf_counter() - started
                path = Path(scratch) / f"{method}.gguf"
                row = _gguf_row(source, quantized, path, None, protocol, scorer, reference)
                rows.append({"model": name, "row": f"{method} {grid}", "calibration_s": round(seconds, 1), **row})
                print(json.dumps(rows[-1]), flush=True)
    return {
        "protocol": protocol.describe(),
        "grid": grid,
        "preset": preset or "method default",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist-dit", "fmnist-unet"])
    parser.add_argument("--methods", nargs="+", default=["qdiffusion"])
    parser.add_argument("--grid", default="q4_0", choices=["q4_0", "q5_0", "q8_0"])
    parser.add_argument("--protocol", default="smoke")
    parser.add_argument("--preset", default=None, help="Method preset (default: each method's fast preset).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = run(args.models, args.methods, args.grid, args.protocol, args.preset)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{payload['protocol']}; {payload['machine']}")
    print(f"{'model':12s} {'row':18s} {'MB':>6s} {'PSNR':>7s} {'SSIM':>6s} {'FID':>7s}")
    for row in payload["rows"]:
        size = f"{row['file_bytes'] / 1e6:6.2f}" if "file_bytes" in row else "     -"
        psnr = f"{row['psnr_vs_ref']:7.2f}" if "psnr_vs_ref" in row else "      -"
        ssim = f"{row['ssim_vs_ref']:6.3f}" if "ssim_vs_ref" in row else "     -"
        print(f"{row['model']:12s} {row['row']:18s} {size} {psnr} {ssim} {row['fid']:7.2f}")


if __name__ == "__main__":
    sys.exit(main())
