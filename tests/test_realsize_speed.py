"""The real-size speed suite's code path on tiny instances (the real run is too large for CI)."""

import builtins
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "realsize_speed.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("realsize_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["realsize_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_suite_runs_every_model_and_skips_a_missing_peer_with_a_note(suite, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):  # as on a machine without the `peers` extra
        if name in ("openvino", "nncf"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    out = tmp_path / "tiny"
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "2", "--batches", "1", "2"]
    variants = ["fp32-eager", "diffquant-w8a8", "diffquant-w4", "openvino"]
    results = suite.main([*argv, "--variants", *variants, "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["models"].keys() == {"sd-unet", "pixart", "mmdit"}
    table = out.with_suffix(".md").read_text()
    for name, model in results["models"].items():
        rows = model["rows"]
        assert rows["openvino"]["skipped"].startswith("skipped: openvino/nncf not installed"), name
        assert "| openvino | skipped: openvino/nncf not installed" in table
        fp32 = rows["fp32-eager"]
        assert set(fp32["call_s"]) == {"1", "2"} and fp32["sampling_2_steps_s"] > 0
        assert fp32["speedup_vs_fp32"]["1"] == 1.0 and fp32["relative_error_vs_fp32"] == 0.0
        for label in ("diffquant W8A8 naive", "diffquant W4 weight-only (packed)"):
            row = rows[label]
            if "skipped" in row:  # recorded with its reason, never a crash
                assert row["skipped"].startswith(("skipped: diffquant could not quantize", "failed:")), row
                continue
            assert 0 < row["relative_error_vs_fp32"] < 0.5, (name, label, row)
            assert row["call_s"]["2"] > 0 and row["disk_mb"] is None or row["disk_mb"] > 0
    w4 = results["models"]["sd-unet"]["rows"]["diffquant W4 weight-only (packed)"]
    assert "packed int4" in w4["notes"][0] and w4["resident_fraction_of_fp32"] < 0.5


def test_unknown_peer_failure_is_recorded_not_raised(suite, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated peer crash")

    monkeypatch.setattr(suite, "make_torchao", broken)
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--models", "sd-unet"]
    results = suite.main([*argv, "--variants", "fp32-eager", "torchao", "--out", str(tmp_path / "t")])
    assert results["models"]["sd-unet"]["rows"]["torchao"]["skipped"] == "failed: RuntimeError: simulated peer crash"
