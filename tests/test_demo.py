"""The main job on tiny settings: report, measured speed, side-by-side picture, unsqueezed table."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from rich.console import Console

from diffquant.demo import NON_TTY_WIDTH, DemoSettings, demo_console, run_demo


@pytest.mark.slow  # ~15 s of CPU: quantizes and samples the shipped DiT
def test_demo_reports_quality_size_speed_and_writes_the_picture(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, width=NON_TTY_WIDTH)
    settings = DemoSettings(
        models=("fmnist-dit",),
        num_samples=10,
        trajectories=2,
        out=tmp_path,
        compile=False,
        speed_batch=2,
        speed_repeats=2,
        preview=4,
    )
    payload = run_demo(settings, console)
    fp32, quantized = payload["rows"]
    assert quantized["speedup"] > 0 and quantized["ms_per_call"] > 0 and fp32["ms_per_call"] > 0
    assert quantized["disk_mb"] < fp32["disk_mb"] / 2  # packed int8 against fp32
    assert 5 < quantized["metrics"]["psnr_vs_ref"] < 100
    assert any("OneDNN" in kernel or "onednn" in kernel.lower() for kernel in quantized["kernels"])
    picture = Image.open(quantized["picture"])
    assert picture.width > 1.6 * picture.height  # two square grids side by side, captions above
    assert json.loads((tmp_path / "report.json").read_text())["rows"][1]["speedup"] == quantized["speedup"]
    text = buffer.getvalue()
    assert "…" not in text and "speedup" in text and f"{quantized['speedup']:.2f}x" in text


def test_piped_output_gets_a_wide_console(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert demo_console().width == NON_TTY_WIDTH
