"""The benchmark report: BENCHMARKS.md, results.csv, plots and side-by-side sample grids."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np

from diffquant.fileio import atomic_file


def file_stem(text: str) -> str:
    """`text` as one file-name component (a model given as a directory path stays one name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


SETTING_ORDER = {"W32A32": 0, "W8A8": 1, "W8A16": 2, "W4A16": 3, "W4A8": 4, "W4A4": 5, "W2A16": 6}
COLUMNS = [
    ("FID", lambda r: _metric(r, "fid", ".2f")),
    ("sFID", lambda r: _metric(r, "sfid", ".2f")),
    ("IS", lambda r: _metric(r, "is", ".2f")),
    ("prec", lambda r: _metric(r, "precision", ".3f")),
    ("rec", lambda r: _metric(r, "recall", ".3f")),
    ("acc", lambda r: _metric(r, "class_accuracy", ".3f")),
    ("PSNR vs fp32", lambda r: _metric(r, "psnr_vs_ref", ".2f")),
    ("SSIM vs fp32", lambda r: _metric(r, "ssim_vs_ref", ".3f")),
    ("calib s", lambda r: _number(r.get("calibration_s"), ".0f")),
    ("calib peak RSS MB", lambda r: _number(r.get("calibration_peak_rss_mb"), ".0f")),
    ("disk MB", lambda r: _number(r.get("disk_mb"), ".2f")),
    ("bits/weight", lambda r: _number(r.get("bits_per_weight"), ".1f")),
    ("speedup", lambda r: _number(r.get("speedup"), ".2f", "x")),
    ("speedup bf16", lambda r: _number(r.get("speedup_bf16"), ".2f", "x")),
    ("coverage", lambda r: (r.get("coverage") or {}).get("text", "-")),
]


def _number(value: Any, fmt: str, suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{fmt}}{suffix}"


def _metric(row: dict, key: str, fmt: str) -> str:
    return _number((row.get("metrics") or {}).get(key), fmt)


def _label(row: dict) -> str:
    suffix = " (peer)" if row.get("family") == "peer" else ""
    return f"{row['method']}{suffix}"


def sorted_rows(rows: list[dict], model: str) -> list[dict]:
    chosen = [r for r in rows if r["model"] == model]
    return sorted(
        chosen, key=lambda r: (SETTING_ORDER.get(r["setting"], 9), r.get("family") != "diffquant", r["method"])
    )


def markdown_table(rows: list[dict], model: str) -> str:
    header = "| method | setting | " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in sorted_rows(rows, model):
        if row.get("status") != "ok":
            lines.append(f"| {_label(row)} | {row['setting']} | {row.get('status')} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = [render(row) for _, render in COLUMNS]
        lines.append(f"| {_label(row)} | {row['setting']} | " + " | ".join(cells) + " |")
    floors = next((r.get("floors") for r in rows if r["model"] == model and r.get("floors")), None)
    if floors:
        lines.append(
            f"| *real train images (floor)* | - | {floors['fid']:.2f} | {floors['sfid']:.2f} | {floors['is']:.2f} | "
            f"{floors['precision']:.3f} | {floors['recall']:.3f} |" + " |" * (len(COLUMNS) - 5)
        )
    return "\n".join(lines)


def _threads(rows: list[dict]) -> str:
    """The torch thread counts the rows ran with (rows that predate the field ran with this process's)."""
    import torch

    counts = sorted({r["threads"] for r in rows if r.get("threads")}) or [torch.get_num_threads()]
    return "/".join(str(c) for c in counts)


def _speed(row: dict) -> str:
    return f"{row['speedup']:.2f}x" if row.get("speedup") else "unmeasured"


def peer_comparison(rows: list[dict], model: str) -> list[str]:
    """Per setting: the best diffquant method against the best peer, by FID."""
    lines = []
    settings = sorted(
        {r["setting"] for r in rows if r["model"] == model and r.get("family") != "reference"},
        key=lambda s: SETTING_ORDER.get(s, 9),
    )
    for setting in settings:
        ok = [r for r in rows if r["model"] == model and r["setting"] == setting and r.get("status") == "ok"]
        ours = [r for r in ok if r.get("family") == "diffquant"]
        peers = [r for r in ok if r.get("family") == "peer"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["metrics"]["fid"])
        text = f"- **{setting}**: best diffquant `{best['method']}` FID {best['metrics']['fid']:.2f}"
        if peers:
            peer = min(peers, key=lambda r: r["metrics"]["fid"])
            delta = peer["metrics"]["fid"] - best["metrics"]["fid"]
            verdict = "beats" if delta > 0 else "trails"
            text += (
                f" vs best peer `{peer['method']}` FID {peer['metrics']['fid']:.2f}: diffquant {verdict} it by "
                f"{abs(delta):.2f} FID (PSNR vs fp32 {best['metrics'].get('psnr_vs_ref', float('nan')):.2f} vs "
                f"{peer['metrics'].get('psnr_vs_ref', float('nan')):.2f} dB; speedup {_speed(best)} vs "
                f"{_speed(peer)}; peer coverage: {(peer.get('coverage') or {}).get('text', '?')})"
            )
        else:
            text += " (no peer ran at this setting)"
        lines.append(text)
    return lines


def write_csv(rows: list[dict], path: Path) -> None:
    fields = [
        "model",
        "method",
        "family",
        "setting",
        "status",
        "num_samples",
        "fid",
        "sfid",
        "is",
        "precision",
        "recall",
        "class_accuracy",
        "psnr_vs_ref",
        "ssim_vs_ref",
        "calibration_s",
        "calibration_peak_rss_mb",
        "disk_mb",
        "bits_per_weight",
        "total_mbit",
        "latency_ms",
        "baseline_ms",
        "speedup",
        "coverage",
    ]
    with atomic_file(path) as scratch, open(scratch, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in fields}
            flat.update({k: v for k, v in (row.get("metrics") or {}).items() if k in fields})
            flat["coverage"] = (row.get("coverage") or {}).get("text")
            writer.writerow(flat)


def _plot(rows: list[dict], model: str, x_key: str, y_key: str, path: Path, title: str, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in sorted_rows(rows, model):
        x = row.get(x_key)
        y = (row.get("metrics") or {}).get(y_key) if y_key in ("fid", "sfid") else row.get(y_key)
        if row.get("status") != "ok" or x is None or y is None:
            continue
        marker = "*" if row.get("family") == "reference" else ("o" if row.get("family") == "diffquant" else "x")
        axis.scatter(x, y, marker=marker, s=60)
        axis.annotate(
            f"{row['method']} {row['setting']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    if log_x:
        axis.set_xscale("log")
    axis.set_xlabel(x_key.replace("_", " "))
    axis.set_ylabel(y_key.upper() if y_key != "speedup" else "speedup vs fp32")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(rows: list[dict], model: str, out: Path) -> list[Path]:
    plots = out / "plots"
    paths = [
        plots / f"{file_stem(model)}-fid-vs-bits-per-weight.png",
        plots / f"{file_stem(model)}-fid-vs-total-bits.png",
        plots / f"{file_stem(model)}-speed-vs-fid.png",
    ]
    _plot(rows, model, "bits_per_weight", "fid", paths[0], f"{model}: FID vs stored bits per weight")
    _plot(rows, model, "total_mbit", "fid", paths[1], f"{model}: FID vs total model size (bit-level scaling)", True)
    speed_rows = [{**r, "fid_value": (r.get("metrics") or {}).get("fid")} for r in rows]
    _plot(speed_rows, model, "fid_value", "speedup", paths[2], f"{model}: speedup vs FID")
    return paths


def write_grid(rows: list[dict], model: str, out: Path) -> Path:
    """One line per row (fp32 first), the same seeds in every column."""
    from PIL import Image, ImageDraw

    chosen = [r for r in sorted_rows(rows, model) if r.get("status") == "ok" and r.get("grid")]
    tiles = [(f"{r['method']} {r['setting']}", np.load(out / r["grid"])) for r in chosen]
    scale, label_width = 3, 170
    height = tiles[0][1].shape[2] * scale if tiles else 0
    width = tiles[0][1].shape[3] * scale if tiles else 0
    count = max((t[1].shape[0] for t in tiles), default=0)
    canvas = Image.new("L", (label_width + count * (width + 2), len(tiles) * (height + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for line, (label, images) in enumerate(tiles):
        top = line * (height + 2)
        draw.text((4, top + height // 2 - 5), label[:28], fill=0)
        for column, image in enumerate(images):
            picture = Image.fromarray(image[0]).resize((width, height), Image.NEAREST)
            canvas.paste(picture, (label_width + column * (width + 2), top))
    path = out / "grids" / f"{file_stem(model)}.png"
    with atomic_file(path) as scratch:
        canvas.save(scratch, format="PNG")
    return path


def scored_under(row: dict, protocol_name: str, num_samples: int) -> bool:
    """Whether a row's numbers come from this protocol at this N (only such rows are comparable)."""
    return row.get("protocol") == protocol_name and row.get("num_samples") == num_samples


def other_n_rows(out: Path, protocol: dict) -> list[dict]:
    """Finished rows in `out` that were scored under another protocol or N (e.g. not yet re-scored)."""
    rows = [json.loads(path.read_text()) for path in sorted((out / "rows").glob("*.json"))]
    name, count = protocol["name"], protocol["num_samples"]
    return [r for r in rows if r.get("status") == "ok" and not scored_under(r, name, count)]


def other_n_section(rows: list[dict], num_samples: int) -> list[str]:
    """A short table of rows scored at another N: FID depends on N, so they stay out of the main tables."""
    if not rows:
        return []
    lines = [
        "## Rows scored at another N",
        "",
        f"Not yet re-scored at N = {num_samples}. FID is biased upward at small N, so compare these FIDs only with "
        "the full-precision FID at their own N; PSNR/SSIM vs fp32 (same seeds, per image) are comparable.",
        "",
        "| model | method | setting | N | FID | PSNR vs fp32 | SSIM vs fp32 | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["model"], SETTING_ORDER.get(r["setting"], 9), r["method"])):
        cells = [_metric(row, "fid", ".2f"), _metric(row, "psnr_vs_ref", ".2f"), _metric(row, "ssim_vs_ref", ".3f")]
        speed = _number(row.get("speedup"), ".2f", "x")
        lines.append(
            f"| {row['model']} | {_label(row)} | {row['setting']} | {row.get('num_samples')} | "
            + " | ".join(cells)
            + f" | {speed} |"
        )
    return lines + [""]


def companion_sections(out: Path) -> list[str]:
    """Markdown sections that companion benchmarks (GGUF files, token models, ...) leave in OUT/sections/,
    in name order, so one report holds every committed table."""
    parts: list[str] = []
    for path in sorted((out / "sections").glob("*.md")):
        parts += [path.read_text().strip(), ""]
    return parts


def sampler_note(rows: list[dict], model: str) -> list[str]:
    """For a token generator: the sampler its rows used in place of the protocol's scheduler."""
    sampler = next((r["sampler"] for r in rows if r["model"] == model and r.get("sampler")), None)
    if sampler is None:
        return []
    guidance = f", CFG {sampler['guidance_scale']:g}" if sampler.get("guidance_scale", 1.0) != 1.0 else ""
    return [
        f"Token generator: sampled with its own sampler ({sampler['sampler']} {sampler['steps']} steps{guidance}) "
        "at the protocol's N and seeds and scored with the same feature network; quantized rows run the "
        "fake-quantization simulation (no real-kernel export for token denoisers yet, so no speedup).",
        "",
    ]


def _link(target: Path, markdown: Path) -> str:
    """`target` relative to the report's folder (works when the report lives outside the results folder)."""
    return Path(os.path.relpath(target.resolve(), markdown.resolve().parent)).as_posix()


def write_report(rows: list[dict], preset_name: str, protocol: dict, out: Path, markdown: Path, command: str) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    write_csv(rows, out / "results.csv")
    sampler = protocol["sampler"]
    parts = [
        "# diffquant benchmarks",
        "",
        f"Regenerate with `{command}` (resumable: finished rows are kept in `{out}/rows/`).",
        "",
        f"Preset `{preset_name}`. Protocol `{protocol['name']}`: {sampler['scheduler'].upper()} {sampler['steps']} "
        f"steps, N = {protocol['num_samples']} samples (seed {protocol['seed']}) scored against "
        f"{protocol['reference']} on the shipped Fashion-MNIST feature network; PSNR/SSIM against the full-precision "
        "model's samples from the same seeds. Machine: "
        f"{platform.machine()}, {_threads(rows)} torch thread(s).",
        "",
        "Columns: calibration time covers recording the calibration data and the method; calib peak RSS MB is the "
        "process's peak resident memory during calibration; disk MB is "
        "what the library's own save path writes; bits/weight = 8 x disk bytes / parameters; speedup is a "
        "batch-64 denoiser call against fp32 (compiled with inductor freezing for compiled rows, eager for eager "
        "peers), timed interleaved in one process; speedup bf16 is the same export with everything around its "
        "int8 kernels in bfloat16 (`compute_dtype='bfloat16'`), timed in the same run (the row's metrics are "
        "float32 compute; the output's relative difference is in the row's `bf16_relative_difference`); "
        "coverage counts the quantized layers.",
        "",
    ]
    for model in models:
        parts += [f"## {model}", "", *sampler_note(rows, model), markdown_table(rows, model), ""]
        parts += ["### diffquant vs the best peer", ""]
        parts += peer_comparison(rows, model) or ["- no comparable rows"]
        plots = write_plots(rows, model, out)
        grid = write_grid(rows, model, out)
        parts += [
            "",
            *(f"![{p.stem}]({_link(p, markdown)})" for p in plots),
            "",
            f"Samples, same seeds per column: ![grid]({_link(grid, markdown)})",
            "",
        ]
    parts += other_n_section(other_n_rows(out, protocol), protocol["num_samples"])
    parts += companion_sections(out)
    failed = [r for r in rows if str(r.get("status", "")).startswith(("failed", "skipped"))]
    if failed:
        parts += ["## Skipped and failed rows", ""]
        parts += [f"- {r['model']} {r['method']} {r['setting']}: {r['status']}" for r in failed]
    with atomic_file(markdown) as scratch:
        scratch.write_text("\n".join(parts) + "\n")
