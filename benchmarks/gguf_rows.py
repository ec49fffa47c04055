"""GGUF rows: the same Q4_0 file type, rounded to nearest (ggml's converter) or by our methods.

    python benchmarks/gguf_rows.py                          # both shipped models, smoke protocol
    python benchmarks/gguf_rows.py --models fmnist-dit --protocol quick
    python benchmarks/gguf_rows.py --models fmnist-t2i --results benchmarks/results/gguf_rows_t2i.json
    python benchmarks/gguf_rows.py --section-only benchmarks/results/gguf_rows*.json   # the report section

Every row is a GGUF file read back by the loader a user of it would use. `fmnist-t2i`'s denoiser is an
SD3 MMDiT: its files are written in the original SD3 layout and loaded by diffusers' own
`SD3Transformer2DModel.from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`, then run in
the shipped pipeline. The other shipped denoisers are diffusers UNet2DModel / DiTTransformer2DModel, which
diffusers cannot load from a single file (its `from_single_file` knows SD/SDXL UNets, SD3, Flux and a few
other families), so their files use the diffusers state-dict layout and are read back by diffquant's own
GGUF reader/dequantizer. Weights only (activations stay float: GGUF holds no activation scales).

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


def _read_back(source: DiffusionModel, path: Path, layout: str, scratch: Path) -> tuple[DiffusionModel, str]:
    """The GGUF file loaded as its users would: diffusers' own single-file loader where it has one."""
    if layout == "original":
        from diffusers import GGUFQuantizationConfig

        config_dir = scratch / "denoiser-config"
        source.denoiser.save_config(config_dir)
        denoiser = type(source.denoiser).from_single_file(
            str(path),
            config=str(config_dir),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            torch_dtype=torch.float32,
        )
        reader = f"diffusers {type(denoiser).__name__}.from_single_file + GGUFQuantizationConfig"
    else:
        denoiser, reader = load_gguf_denoiser(path), "diffquant.runtime.gguf.load_gguf_denoiser"
    model = DiffusionModel(denoiser, source.info, source.scheduler_config, pipeline=source.pipeline)
    return model, reader


def _gguf_row(source: DiffusionModel, model, path: Path, float_type: str | None, protocol, scorer, reference) -> dict:
    report = export_gguf(model, path, float_type=float_type).to_json()
    read_back, reader = _read_back(source, path, report["layout"], path.parent)
    metrics, _ = _score(read_back, protocol, scorer, reference)
    facts = {k: report[k] for k in ("file_bytes", "types", "ours", "layout", "architecture")}
    return {**facts, "reader": reader, **metrics}


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


SECTION = Path(__file__).parent / "results" / "full" / "sections" / "gguf.md"


def section_markdown(payloads: list[dict]) -> str:
    """The BENCHMARKS.md section: every GGUF row of the given result files, one table."""
    lines = [
        "## GGUF files: round-to-nearest vs our methods on the same block type",
        "",
        "Each row is a GGUF file written by `diffquant export --format gguf` (weights only) and read back by the "
        "loader its users would use (column `reader`). `rtn` is the float model rounded by ggml's own rule "
        "(bit-exact with the `gguf` package); a method row is calibrated with `weight_grid=<type>`, so its "
        "learned codes land on the same grid and the file is the same size. Regenerate with "
        "`python benchmarks/gguf_rows.py` (see its docstring).",
        "",
        "| model | row | protocol | file MB | FID | FID / fp32 | PSNR vs fp32 | SSIM vs fp32 | calib s | reader |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for payload in payloads:
        protocol = payload["protocol"].split(":")[0] + ", N=" + payload["protocol"].split("N=")[1].split()[0]
        fp32 = {row["model"]: row["fid"] for row in payload["rows"] if row["row"] == "fp32"}
        for row in payload["rows"]:
            size = f"{row['file_bytes'] / 1e6:.2f}" if "file_bytes" in row else "-"
            psnr = f"{row['psnr_vs_ref']:.2f}" if "psnr_vs_ref" in row else "-"
            ssim = f"{row['ssim_vs_ref']:.3f}" if "ssim_vs_ref" in row else "-"
            calib = f"{row['calibration_s']:.0f}" if "calibration_s" in row else "-"
            reader = row.get("reader", payload.get("reader", "-")) if "file_bytes" in row else "-"
            reader = reader.split(":")[0]
            lines.append(
                f"| {row['model']} | {row['row']} | {protocol} | {size} | {row['fid']:.2f} | "
                f"{row['fid'] / fp32[row['model']]:.3f} | {psnr} | {ssim} | {calib} | {reader} |"
            )
    return "\n".join(lines) + "\n"


def write_section(results: list[Path], section: Path) -> None:
    payloads = [json.loads(path.read_text()) for path in results]
    section.parent.mkdir(parents=True, exist_ok=True)
    section.write_text(section_markdown(payloads))
    print(f"section with {sum(len(p['rows']) for p in payloads)} rows -> {section}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist-dit", "fmnist-unet"])
    parser.add_argument("--methods", nargs="+", default=["qdiffusion"])
    parser.add_argument("--grid", default="q4_0", choices=["q4_0", "q5_0", "q8_0"])
    parser.add_argument("--protocol", default="smoke")
    parser.add_argument("--preset", default=None, help="Method preset (default: each method's fast preset).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--section-only",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="Only write the BENCHMARKS.md section (--section) from these result files.",
    )
    parser.add_argument("--section", type=Path, default=SECTION, help="Markdown section for the bench report.")
    args = parser.parse_args(argv)
    if args.section_only:
        write_section(args.section_only, args.section)
        return
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
