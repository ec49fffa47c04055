"""Terminal tables for evaluation results and the model zoo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from diffquant.zoo.registry import REFERENCE_MODELS, WEIGHTS_DIR

METRIC_COLUMNS = [
    ("fid", "FID", "{:.2f}"),
    ("sfid", "sFID", "{:.2f}"),
    ("is", "IS", "{:.2f}"),
    ("precision", "Prec", "{:.3f}"),
    ("recall", "Rec", "{:.3f}"),
    ("class_accuracy", "Acc", "{:.3f}"),
    ("psnr_vs_ref", "PSNR", "{:.2f}"),
    ("ssim_vs_ref", "SSIM", "{:.3f}"),
    ("inception_fid", "Incep-FID", "{:.2f}"),
    ("ms_per_image", "ms/img", "{:.1f}"),
]


def _format(metrics: dict[str, Any], key: str, pattern: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else pattern.format(value)


def print_eval_table(
    rows: list[dict[str, Any]], title: str, console: Console | None = None, extra: bool = False
) -> None:
    """One row per model; `extra` adds disk size and calibration time columns."""
    console = console or Console()
    present = [c for c in METRIC_COLUMNS if any(c[0] in r["metrics"] for r in rows)]
    table = Table(title=title)
    table.add_column("model")
    for _, header, _ in present:
        table.add_column(header, justify="right")
    if extra:
        table.add_column("disk MB", justify="right")
        table.add_column("calib s", justify="right")
    for row in rows:
        cells = [_format(row["metrics"], k, p) for k, _, p in present]
        if extra:
            cells.append(f"{row['disk_mb']:.2f}" if "disk_mb" in row else "-")
            cells.append(f"{row['calibration_s']:.0f}" if "calibration_s" in row else "-")
        table.add_row(row["model"], *cells)
    console.print(table)


def print_model_table(console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="diffquant reference models")
    for header in ("name", "architecture", "params", "trained", "FID (N, protocol)", "class acc."):
        table.add_column(header)
    for name, reference in REFERENCE_MODELS.items():
        card_file = WEIGHTS_DIR / name / "metrics.json"
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        metrics = card.get("metrics", {})
        fid = (
            f"{metrics['fid']:.2f} (N={card['protocol']['num_samples']}, {card['protocol']['name']})"
            if metrics
            else "-"
        )
        accuracy = f"{metrics['class_accuracy']:.3f}" if "class_accuracy" in metrics else "-"
        table.add_row(
            name,
            reference.info.architecture,
            f"{card.get('parameters', 0) / 1e6:.2f} M" if card else "-",
            "yes" if (WEIGHTS_DIR / name / "config.json").is_file() else "no",
            fid,
            accuracy,
        )
    console.print(table)


def directory_megabytes(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def print_quantization_summary(model, directory, console: Console | None = None) -> None:
    from diffquant.modules import attention_processors, quant_layers

    console = console or Console()
    record = model.quantization
    layers = dict(quant_layers(model.denoiser))
    kinds: dict[str, int] = {}
    for layer in layers.values():
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    attention = sum(1 for _ in attention_processors(model.denoiser))
    coverage = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    if attention:
        coverage += f", {attention} attention matmul pairs"
    console.print(
        f"[bold]{record['method']} {record['setting']}[/bold] on {record['source_model']}: quantized {coverage}; "
        f"calibration {record['calibration']['samples']} inputs ({record['calibration'].get('policy', '?')}), "
        f"{record['calibration_wall_time_s']:.1f} s + {record['calibration']['recording_s']:.1f} s recording, "
        f"peak RSS {record['calibration_peak_rss_mb']:.0f} MB; "
        f"saved {directory_megabytes(directory):.2f} MB to {directory}"
    )
