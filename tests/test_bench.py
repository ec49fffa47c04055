"""The benchmark harness: matrix, resumability, peer skipping, report, and the smoke preset end to end."""

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import diffquant
from diffquant.bench import BENCH_PRESETS, RowSpec
from diffquant.bench.peers import PEERS
from diffquant.bench.report import markdown_table, peer_comparison, write_report
from diffquant.bench.runner import BenchRunner, _claim
from diffquant.calibration import UniformSteps, record_trajectories
from diffquant.cli import app
from diffquant.methods import make_config
from diffquant.sampling import SamplerConfig
from tests.conftest import needs_fmnist, tiny_unet_model


def fake_row(method, setting, fid, family="diffquant", psnr=30.0):
    return {
        "model": "m",
        "method": method,
        "setting": setting,
        "family": family,
        "status": "ok",
        "metrics": {
            "fid": fid,
            "sfid": fid,
            "is": 3.0,
            "precision": 0.8,
            "recall": 0.6,
            "psnr_vs_ref": psnr,
            "ssim_vs_ref": 0.9,
        },
        "disk_mb": 1.0,
        "bits_per_weight": 8.0,
        "total_mbit": 8.0,
        "coverage": {"text": "all"},
    }


def test_matrix_rows_and_keys():
    rows = BENCH_PRESETS["full"].rows()
    assert len(rows) == 3 * 4 * (9 + 4)  # models x settings x (methods + peers)
    assert {row.model for row in rows} == {"fmnist-unet", "fmnist-dit", "fmnist-t2i"}
    assert RowSpec("fmnist-unet", "naive", "W4A8").key == "fmnist-unet__naive__W4A8"
    assert RowSpec("fmnist-unet", "naive", "W4A16").bits == (4, None)


def test_a_method_preset_is_named_after_an_at_sign(tmp_path):
    spec = RowSpec("fmnist-unet", "qdiffusion@paper", "W4A8")
    assert (spec.method_name, spec.method_preset, spec.key) == (
        "qdiffusion",
        "paper",
        "fmnist-unet__qdiffusion_paper__W4A8",
    )
    runner = BenchRunner(BENCH_PRESETS["smoke"], tmp_path, progress=False)
    paper = runner.method_config(spec)
    smoke = runner.method_config(RowSpec("fmnist-unet", "qdiffusion", "W4A8"))
    # the named preset's official counts, not the smoke preset's shortened ones
    assert (paper.preset, paper.reconstruction.weight_iters, paper.calibration.trajectories) == ("paper", 20000, 256)
    assert smoke.reconstruction.weight_iters == 20 and (paper.wbits, paper.abits) == (4, 8)


@pytest.mark.parametrize("method, named", [("qdiffusion@nope", "nope"), ("nosuch", "nosuch")])
def test_an_unknown_method_or_preset_fails_before_any_row_runs(method, named):
    with pytest.raises(diffquant.errors.ConfigError, match=named):
        replace(BENCH_PRESETS["full"], methods=(method,)).rows()


def test_report_tables_and_peer_verdicts(tmp_path):
    rows = [
        fake_row("naive", "W8A8", 10.0),
        fake_row("quanto", "W8A8", 12.0, "peer"),
        fake_row("naive", "W4A16", 30.0),
        fake_row("torchao", "W4A16", 25.0, "peer"),
        {"model": "m", "method": "pt2e", "setting": "W4A16", "family": "peer", "status": "skipped: no W4 mode"},
    ]
    table = markdown_table(rows, "m")
    assert table.index("| naive | W8A8") < table.index("| quanto (peer) | W8A8") < table.index("| naive | W4A16")
    verdicts = peer_comparison(rows, "m")
    assert "diffquant beats it by 2.00 FID" in verdicts[0]
    assert "diffquant trails it by 5.00 FID" in verdicts[1]
    for row in rows[:4]:
        row["grid"] = f"grids/m/{row['method']}.npy"
        (tmp_path / "grids" / "m").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / row["grid"], np.zeros((4, 1, 28, 28), np.uint8))
    protocol = {
        "name": "smoke",
        "sampler": {"scheduler": "ddim", "steps": 20},
        "num_samples": 200,
        "seed": 0,
        "reference": "fashion-mnist-test",
    }
    # a row not yet re-scored at this N is listed apart, with its own N, never in the main table
    (tmp_path / "rows").mkdir()
    older = {**fake_row("tfmq", "W4A4", 300.0), "protocol": "smoke", "num_samples": 100}
    (tmp_path / "rows" / "m__tfmq__W4A4.json").write_text(json.dumps(older))
    current = {**fake_row("naive", "W8A8", 10.0), "protocol": "smoke", "num_samples": 200}
    (tmp_path / "rows" / "m__naive__W8A8.json").write_text(json.dumps(current))
    (tmp_path / "sections").mkdir()  # companion benchmarks' tables are appended in name order
    (tmp_path / "sections" / "b.md").write_text("## B rows\n\n| b |\n")
    (tmp_path / "sections" / "a.md").write_text("## A rows\n")
    write_report(rows, "smoke", protocol, tmp_path, tmp_path / "BENCHMARKS.md", "diffquant bench")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## m" in text and "skipped: no W4 mode" in text
    main, other = text.split("## Rows scored at another N")
    assert "| m | tfmq | W4A4 | 100 | 300.00 |" in other and "tfmq" not in main
    assert "| m | naive |" not in other
    assert other.index("## A rows") < other.index("## B rows\n\n| b |")
    for name in ("results.csv", "plots/m-fid-vs-bits-per-weight.png", "plots/m-fid-vs-total-bits.png", "grids/m.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_missing_peer_is_skipped_not_a_crash(monkeypatch):
    import diffquant.bench.peers as peers

    monkeypatch.setattr(peers, "_version", lambda package: None)
    assert "not installed" in PEERS["quanto"].unavailable()


@needs_fmnist
def test_finished_rows_are_kept_failed_and_other_n_rows_recomputed(tmp_path, monkeypatch):
    preset = BENCH_PRESETS["smoke"]
    runner = BenchRunner(preset, tmp_path, num_samples=20, progress=False)
    same = {"protocol": runner.protocol.name, "num_samples": 20}
    kept, stale = RowSpec("fmnist-unet", "naive", "W8A8"), RowSpec("fmnist-unet", "naive", "W4A16")
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    reference = {"model": "fmnist-unet", "family": "reference", **same}
    (rows_dir / "fmnist-unet__fp32.json").write_text(json.dumps(reference))
    (rows_dir / f"{kept.key}.json").write_text(json.dumps({"model": "fmnist-unet", "status": "ok", "done": 1, **same}))
    (rows_dir / f"{stale.key}.json").write_text(json.dumps({**same, "num_samples": 5000, "done": 0}))
    failed = RowSpec("fmnist-unet", "ptq4dm", "W8A8")
    (rows_dir / f"{failed.key}.json").write_text(json.dumps({**same, "status": "failed: OSError: disk full"}))
    recomputed = []

    def fake_row(self, spec):
        recomputed.append(spec.key)
        return {"model": spec.model, "status": "ok", "done": 2, **same}

    monkeypatch.setattr(BenchRunner, "run_row", fake_row)
    rows = runner.run([kept, stale, failed])
    # the N=5000 row does not belong to an N=20 report; a failed row is retried
    assert recomputed == [stale.key, failed.key]
    assert [row["done"] for row in rows[1:]] == [1, 2, 2]
    assert runner.finished_rows()[0]["family"] == "reference"
    assert len(runner.finished_rows()) == 4


@pytest.mark.slow
@needs_fmnist
def test_smoke_preset_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "smoke", "--out", str(tmp_path), "--threads", "2"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in payload["rows"]}
    ok = [r for r in payload["rows"] if r.get("status") == "ok" and r["method"] != "fp32"]
    assert len(ok) >= 6  # the three diffquant methods at two settings (peers may be skipped)
    for row in ok:
        assert all(math.isfinite(v) for v in row["metrics"].values())
        assert 10.0 < row["metrics"]["psnr_vs_ref"] < 100.0
    # eight-bit weights stay closer to full precision than four-bit ones
    assert rows[("naive", "W8A8")]["metrics"]["psnr_vs_ref"] > rows[("naive", "W4A16")]["metrics"]["psnr_vs_ref"]
    assert rows[("naive", "W8A8")]["disk_mb"] < rows[("fp32", "W32A32")]["disk_mb"] / 3
    assert "| naive | W8A8 |" in (tmp_path / "BENCHMARKS.md").read_text()
    kept = json.loads((tmp_path / "models" / "fmnist-unet__naive__W8A8.calibration.json").read_text())
    assert kept["calibration_s"] == rows[("naive", "W8A8")]["calibration_s"]  # survives a kill while scoring
    # speedups re-timed on a quiet machine with the current kernels, without re-sampling
    before = json.loads((tmp_path / "rows" / "fmnist-unet__naive__W8A8.json").read_text())
    # (its own process, as users run it: a quiet re-timing pass after the sample-heavy run)
    refreshed = subprocess.run(
        [sys.executable, "-c", "from diffquant.cli import app; app()", "bench", "--preset", "smoke"]
        + ["--out", str(tmp_path), "--threads", "2", "--refresh-latency"]
        + ["--method", "naive", "--setting", "W8A8", "--peer", "none"],
        capture_output=True,
        text=True,
    )
    assert refreshed.returncode == 0, refreshed.stderr[-3000:]
    assert "not refreshed" not in refreshed.stderr + refreshed.stdout
    after = json.loads((tmp_path / "rows" / "fmnist-unet__naive__W8A8.json").read_text())
    assert "speedup" not in before and after["speedup"] > 0.5
    assert after["latency_mode"] == "onednn int8 compiled vs fp32 compiled"
    assert after["metrics"] == before["metrics"]
    from diffquant.runtime.kernels_int4 import bf16_matmul_supported

    if bf16_matmul_supported():  # the bfloat16-compute export is timed beside it, and differs only by rounding
        assert after["speedup_bf16"] > 0.5 and 0 < after["bf16_relative_difference"] < 0.05
        assert "| speedup bf16 |" in (tmp_path / "BENCHMARKS.md").read_text()


def test_a_saved_calibration_is_reused_when_only_n_changes(tmp_path):
    # re-scoring a row at another N reloads the model that row calibrated instead of calibrating again
    runner = BenchRunner(BENCH_PRESETS["smoke"], tmp_path, num_samples=20, progress=False)
    spec = RowSpec("tiny-unet", "naive", "W8A8")
    model = tiny_unet_model()
    calibration = record_trajectories(model, 4, SamplerConfig("ddim", 4), UniformSteps(2), progress=False)
    config = make_config("naive", wbits=8, abits=8)
    diffquant.save(diffquant.quantize(model, config, calibration, progress=False), tmp_path / "models" / spec.key)
    (tmp_path / "rows").mkdir()
    earlier = {"status": "ok", "num_samples": 1000, "calibration_s": 12.5, "calibration_samples": 16, "disk_mb": 0.1}
    (tmp_path / "rows" / f"{spec.key}.json").write_text(json.dumps(earlier))
    reused = runner._calibrated_before(spec, config)
    assert reused is not None
    loaded, measured = reused
    assert measured["calibration_s"] == 12.5 and measured["calibration_from_run_with_n"] == 1000
    assert loaded.quantization["config"]["wbits"] == 8
    # a changed config (or a failed earlier row) calibrates again
    assert runner._calibrated_before(spec, make_config("naive", wbits=4, abits=8)) is None
    (tmp_path / "rows" / f"{spec.key}.json").write_text(json.dumps({**earlier, "status": "failed: OSError"}))
    assert runner._calibrated_before(spec, config) is None
    # ... unless the failed run had finished calibrating: its measurements were kept beside the model
    (tmp_path / "models" / f"{spec.key}.calibration.json").write_text(json.dumps({**earlier, "calibration_s": 99.0}))
    assert runner._calibrated_before(spec, config)[1]["calibration_s"] == 99.0


def test_processes_sharing_a_results_folder_split_the_rows(tmp_path, monkeypatch):
    # a row claimed by a live process is left to it; a dead process's claim is taken over
    row_file = tmp_path / "rows" / "m__naive__W8A8.json"
    assert _claim(row_file)
    assert not _claim(row_file)  # held by this (live) process
    row_file.with_suffix(".lock").write_text(f"{socket.gethostname()}:{2**22 + 12345}")  # no such pid
    assert _claim(row_file)
    # the runner skips rows another process holds and releases its own once written
    runner = BenchRunner(BENCH_PRESETS["smoke"], tmp_path, num_samples=20, progress=False)
    busy, free = RowSpec("tiny-unet", "naive", "W8A8"), RowSpec("tiny-unet", "naive", "W4A16")
    (tmp_path / "rows" / f"{busy.key}.lock").write_text(f"{socket.gethostname()}:{os.getppid()}")
    monkeypatch.setattr(BenchRunner, "run_row", lambda self, spec: {"key": spec.key, "status": "ok"})
    assert [row["key"] for row in runner.run([busy, free])] == [free.key]
    assert not (tmp_path / "rows" / f"{free.key}.lock").exists()
    assert json.loads((tmp_path / "rows" / f"{free.key}.json").read_text())["key"] == free.key


def test_latency_of_the_same_kernels_is_kept_across_n(tmp_path):
    runner = BenchRunner(BENCH_PRESETS["smoke"], tmp_path, num_samples=20, progress=False)
    spec = RowSpec("tiny-unet", "naive", "W8A8")
    kernels = {"linear: onednn::qlinear_pointwise": 3}
    (tmp_path / "rows").mkdir()
    timed = {"speedup": 1.6, "latency_ms": 10.0, "baseline_ms": 16.0, "latency_kernels": kernels}
    earlier = {"status": "ok", "num_samples": 1000, "version": "1", "kernels": kernels, **timed}
    (tmp_path / "rows" / f"{spec.key}.json").write_text(json.dumps(earlier))
    kept = runner._earlier_latency(spec, {"version": "1", "kernels": kernels})
    assert kept["speedup"] == 1.6 and kept["latency_from_run_with_n"] == 1000
    # other kernels (or another library version) are timed again
    assert runner._earlier_latency(spec, {"version": "1", "kernels": {"linear: float": 3}}) is None
    assert runner._earlier_latency(spec, {"version": "2", "kernels": kernels}) is None


@pytest.mark.parametrize("peer", ["quanto", "torchao", "modelopt", "pt2e"])
def test_a_peer_without_w4a4_says_why_in_its_row(peer, tmp_path, monkeypatch):
    import diffquant.bench.peers as peers

    monkeypatch.setattr(peers, "_version", lambda package: "1.0")  # installed or not, the reason is the mode
    monkeypatch.setattr(BenchRunner, "model_state", lambda self, model: {"source": None})
    runner = BenchRunner(BENCH_PRESETS["full"], tmp_path, progress=False)
    row = runner.run_row(RowSpec("fmnist-dit", peer, "W4A4", "peer"))
    assert row["status"] == f"skipped: {PEERS[peer].missing['W4A4']}"
    assert "has no" not in row["status"]  # a real reason, not the generic one
