"""The main job (`diffquant demo`, `scripts/quickstart.sh`): quality, size, measured speed and pictures.

For each shipped model: sample it in fp32 under the protocol, quantize it, export the quantized model
to the real int8 oneDNN kernels (compiled), sample *that* from the same seeds, and report
* quality - FID of both, PSNR/SSIM of the deployed model against fp32 on the same seeds;
* size - the fp32 and quantized directories on disk;
* speed - median milliseconds per denoiser call of the deployed model against fp32 under
  torch.compile (inductor with weight freezing, the strongest fp32 baseline), measured here, in turns;
* a side-by-side PNG: fp32 samples on the left, quantized on the right, same seeds.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from diffquant.profiling import interleaved_medians

PEER_LOGGERS = ("torchao", "optimum", "modelopt", "torch.utils._pytree", "diffusers.quantizers")
NON_TTY_WIDTH = 160


@dataclass
class DemoSettings:
    """What the demo runs; the defaults finish in about 10 minutes on 2 CPU cores."""

    models: tuple[str, ...] = ("fmnist-unet", "fmnist-dit")
    method: str = "ptq4dm"
    wbits: int = 8
    abits: int | None = 8
    protocol: str = "smoke"
    """smoke (N = 200, DDIM 20), quick or standard."""
    num_samples: int | None = None
    """Override the protocol's N (>= 10)."""
    trajectories: int = 64
    """Calibration trajectories (fewer than the papers' for speed)."""
    out: Path = Path("runs/demo")
    compile: bool = True
    """Compare compiled with compiled (the deployed model and fp32 both under torch.compile)."""
    speed_batch: int = 64
    speed_repeats: int = 10
    preview: int = 32
    """Samples per side in the PNG."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More method options."""


def quiet_peer_libraries() -> None:
    """Optional peer libraries (torchao, quanto, modelopt) log import-time warnings the user cannot act on."""
    for name in PEER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("torchao", "optimum", "modelopt", "scipy"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message="Matrix is singular")  # sqrtm on a small N's covariance
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def demo_console() -> Console:
    """A console that does not squeeze tables to 80 columns when the output is piped or logged."""
    return Console() if sys.stdout.isatty() else Console(width=NON_TTY_WIDTH)


def _call(module: torch.nn.Module, inputs: tuple) -> callable:
    from diffquant.quant import step_context

    x, t, kwargs = inputs

    def run() -> None:
        with torch.no_grad(), step_context(0, float(t[0]), 50):
            module(x, t, **kwargs)

    return run


def measure_speedup(source, deployed, batch: int, repeats: int, compile: bool) -> dict[str, float]:
    """Median ms per denoiser call of the deployed model and of fp32 (both compiled when `compile`), in turns."""
    from torch._inductor import config as inductor_config

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *source.info.image_shape), generator=generator)
    t = torch.full((batch,), 500)
    kwargs = {"class_labels": torch.arange(batch) % source.info.num_classes} if source.info.conditional else {}
    fp32 = copy.deepcopy(source.denoiser).eval()
    if compile:
        # sampling at other batch sizes left this forward marked dynamic; both models are timed at one batch,
        # and inductor's frozen fp32 convolutions mis-stride under dynamic shapes (torch 2.13)
        torch._dynamo.reset()
        inductor_config.freezing = True  # constant-folds and prepacks fp32 weights: the strongest baseline
        fp32 = torch.compile(fp32)
        _call(fp32, (x, t, kwargs))()
        inductor_config.freezing = False
    calls = {"fp32": _call(fp32, (x, t, kwargs)), "int8": _call(deployed.denoiser, (x, t, kwargs))}
    medians = interleaved_medians(calls, repeats, warmup=2)
    fp32_ms, int8_ms = medians["fp32"], medians["int8"]
    return {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms, "batch": batch}


def side_by_side(left: torch.Tensor, right: torch.Tensor, path: Path, labels: tuple[str, str]) -> Path:
    """Two image grids next to each other with a caption over each (same seeds, same positions)."""
    from diffquant.fileio import atomic_file
    from diffquant.sampling.grid import image_grid

    columns = max(1, int(len(left) ** 0.5))
    grids = [image_grid(images, columns, scale=3).convert("RGB") for images in (left, right)]
    caption, gap = 18, 12
    width = grids[0].width + grids[1].width + gap
    canvas = Image.new("RGB", (width, grids[0].height + caption), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (grid, label) in enumerate(zip(grids, labels, strict=True)):
        left_edge = index * (grids[0].width + gap)
        canvas.paste(grid, (left_edge, caption))
        draw.text((left_edge + 4, 3), label, fill="black")
    with atomic_file(path) as scratch:
        canvas.save(scratch, format="PNG")
    return path


def _demo_model(name: str, settings: DemoSettings, protocol, scorer, console: Console) -> list[dict[str, Any]]:
    import diffquant
    from diffquant.evaluation import cached_samples, evaluate
    from diffquant.methods import make_config
    from diffquant.reporting import directory_megabytes
    from diffquant.runtime.export import export_model

    console.print(f"[bold]{name}[/bold]: fp32 samples ({protocol.describe()})")
    source = diffquant.load(name)
    reference = cached_samples(source, protocol, progress=False)
    fp32_metrics = scorer.score(reference, _labels(source, protocol), protocol.precision_recall_k)
    config = make_config(settings.method, wbits=settings.wbits, abits=settings.abits, **settings.extra)
    config.calibration.trajectories = settings.trajectories
    config.validate()
    console.print(f"  quantizing with {settings.method} {config.setting} ({settings.trajectories} trajectories)")
    quantized = diffquant.quantize(source, config, progress=False)
    directory = diffquant.save(quantized, settings.out / f"{name}-{settings.method}-{config.setting.lower()}")
    console.print(f"  exporting to int8 oneDNN kernels{' (torch.compile)' if settings.compile else ''}")
    deployed = export_model(quantized, "onednn", compile=settings.compile)
    report = evaluate(deployed, protocol, scorer, reference, progress=False)
    console.print(f"  timing the deployed model against fp32 (batch {settings.speed_batch})")
    speed = measure_speedup(source, deployed, settings.speed_batch, settings.speed_repeats, settings.compile)
    count = min(settings.preview, len(reference))
    picture = side_by_side(
        reference[:count],
        report.images[:count],
        settings.out / f"{name}-fp32-vs-{settings.method}-{config.setting.lower()}.png",
        ("fp32", f"{settings.method} {config.setting} (int8 kernels)"),
    )
    record = quantized.quantization
    kernels = deployed.quantization.get("kernels", {})
    return [
        {
            "model": f"{name} fp32",
            "metrics": fp32_metrics,
            "disk_mb": directory_megabytes(source.path),
            "ms_per_call": speed["fp32_ms"],
        },
        {
            "model": f"{name} {settings.method} {config.setting}",
            "metrics": report.metrics,
            "disk_mb": directory_megabytes(directory),
            "ms_per_call": speed["int8_ms"],
            "speedup": speed["speedup"],
            "calibration_s": record["calibration_wall_time_s"] + record["calibration"]["recording_s"],
            "kernels": kernels,
            "path": str(directory),
            "picture": str(picture),
        },
    ]


def _labels(model, protocol) -> torch.Tensor | None:
    from diffquant.sampling.sampler import default_labels

    return default_labels(model, protocol.num_samples)


def print_demo_table(rows: list[dict[str, Any]], title: str, console: Console, compiled: bool) -> None:
    table = Table(title=title)
    headers = [
        "model",
        "FID",
        "PSNR vs fp32",
        "SSIM",
        "disk MB",
        "ms/call" + (" (compiled)" if compiled else ""),
        "speedup",
    ]
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in rows:
        metrics = row["metrics"]
        table.add_row(
            row["model"],
            f"{metrics['fid']:.2f}",
            f"{metrics['psnr_vs_ref']:.2f} dB" if "psnr_vs_ref" in metrics else "-",
            f"{metrics['ssim_vs_ref']:.3f}" if "ssim_vs_ref" in metrics else "-",
            f"{row['disk_mb']:.2f}",
            f"{row['ms_per_call']:.1f}",
            f"{row['speedup']:.2f}x" if "speedup" in row else "1.00x",
        )
    console.print(table)


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict[str, Any]:
    """Run the main job and print its report; also written to `<out>/report.json`."""
    quiet_peer_libraries()
    from diffquant.evaluation import Scorer, get_protocol
    from diffquant.fileio import write_json

    console = console or demo_console()
    overrides = {}
    if settings.num_samples is not None:
        overrides = {"num_samples": settings.num_samples, "batch_size": min(settings.num_samples, 250)}
    protocol = get_protocol(settings.protocol, **overrides)
    scorer = Scorer.load(protocol.reference)
    settings.out = Path(settings.out)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in settings.models:
        rows += _demo_model(name, settings, protocol, scorer, console)
    elapsed = time.perf_counter() - started
    print_demo_table(rows, f"diffquant demo - {protocol.describe()}", console, settings.compile)
    threads = torch.get_num_threads()
    console.print(
        f"speed: median of {settings.speed_repeats} denoiser calls (batch {settings.speed_batch}, {threads} "
        f"thread{'s' if threads > 1 else ''}), int8 oneDNN kernels vs fp32"
        + (", both under torch.compile" if settings.compile else ", both eager")
    )
    for row in rows:
        if "picture" in row:
            console.print(f"side by side (fp32 | quantized, same seeds): {row['picture']}")
    payload = {
        "protocol": protocol.to_json(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "threads": threads,
        "wall_time_s": elapsed,
        "rows": rows,
    }
    write_json(settings.out / "report.json", payload)
    console.print(f"report written to {settings.out / 'report.json'} ({elapsed / 60:.1f} minutes)")
    return payload
