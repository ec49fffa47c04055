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


@pytest.fixture(scope="module")
def attention_kernels():
    spec = importlib.util.spec_from_file_location("attention_kernels", SCRIPT.parent / "attention_kernels.py")
    module = importlib.util.module_from_spec(spec)
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
    variants = ["fp32-eager", "diffquant-w8a8", "diffquant-w8a8-inductor", "diffquant-w4", "openvino"]
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
        for label in ("diffquant W8A8 naive", "diffquant W8A8 naive [inductor]", "diffquant W4 weight-only (packed)"):
            row = rows[label]  # every family quantizes (calibration calls the bare model by keyword)
            assert "skipped" not in row, (name, label, row)
            assert 0 < row["relative_error_vs_fp32"] < 0.5, (name, label, row)
            assert row["call_s"]["2"] > 0 and row["disk_mb"] is None or row["disk_mb"] > 0
    w4 = results["models"]["sd-unet"]["rows"]["diffquant W4 weight-only (packed)"]
    assert "packed int4" in w4["notes"][0] and w4["resident_fraction_of_fp32"] < 0.5


def test_unknown_peer_failure_is_recorded_not_raised(suite, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated peer crash\nExceptions print several lines")

    monkeypatch.setattr(suite, "make_torchao", broken)
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--models", "sd-unet"]
    results = suite.main([*argv, "--variants", "fp32-eager", "torchao", "--out", str(tmp_path / "t")])
    expected = "failed: RuntimeError: simulated peer crash Exceptions print several lines"
    assert results["models"]["sd-unet"]["rows"]["torchao"]["skipped"] == expected  # one line: a table cell
    assert f"| torchao | {expected} |" in (tmp_path / "t.md").read_text()


def test_fixed_size_position_table_gives_the_same_output(suite):
    import torch

    torch.manual_seed(0)
    case = suite.build_mmdit(True, 1)
    sample, timestep, conditioning = case.inputs(1)
    embed = case.denoiser.inner.pos_embed
    assert embed.pos_embed_max_size is not None  # SD3's cropped table: the case the helper exists for
    with torch.no_grad():
        before = embed(sample)
        suite.fixed_size_position_tables(case.denoiser, sample)
        after = embed(sample)
    assert embed.pos_embed_max_size is None
    assert torch.equal(before, after)


def test_openvino_quantizes_every_tiny_family_when_installed(suite, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--batches", "1"]
    variants = ["fp32-eager", "openvino", "diffquant-w8a8-openvino"]
    methods = ["--methods", "naive", "naive:attention_bits=8"]  # our grids on OpenVINO, attention quantized too
    results = suite.main([*argv, *methods, "--variants", *variants, "--out", str(tmp_path / "ov")])
    labels = ["openvino", "diffquant W8A8 naive [openvino]", "diffquant W8A8 naive:attention_bits=8 [openvino]"]
    for name, model in results["models"].items():  # the SD3 MMDiT's cropped position table once failed to trace
        for label in labels:
            row = model["rows"][label]
            assert "skipped" not in row, (name, label, row)
            assert 0 < row["relative_error_vs_fp32"] < 0.5, (name, label, row)
        assert "openvino int8 FullyConnected" in model["rows"][labels[1]]["notes"][0]


def test_section_merges_runs_into_one_table_plot_and_headline(suite, tmp_path):
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "2"]
    int8 = ["--variants", "fp32-eager", "diffquant-w8a8", "torchao", "--loop-variants", "diffquant-w8a8"]
    runs = {  # a model's variants split over two processes, as at real size where they do not fit in RAM
        "sd-int8": ["--models", "sd-unet", *int8],
        "sd-float": ["--models", "sd-unet", "--variants", "fp32-eager", "diffquant-w4"],
        "mmdit": ["--models", "mmdit", "--batches", "1", *int8],
    }
    for stem, options in runs.items():
        suite.main([*argv, *options, "--out", str(tmp_path / stem)])
    section = tmp_path / "sections" / "realsize.md"
    text = suite.write_section([tmp_path / f"{stem}.json" for stem in runs], section, tmp_path)
    merged = __import__("json").loads((tmp_path / "real.json").read_text())
    assert merged["models"].keys() == {"sd-unet", "mmdit"} and merged["batches"] == [1, 2]
    rows = merged["models"]["sd-unet"]["rows"]
    assert rows["fp32-eager"]["run"] == 1 and rows["fp32-eager (run 2)"]["run"] == 2  # each run keeps its baseline
    assert rows["diffquant W4 weight-only (packed)"]["run"] == 2
    assert "sampling_2_steps_s" in rows["diffquant W8A8 naive"] and "sampling_2_steps_s" not in rows["torchao"]
    assert (tmp_path / "speedup.png").stat().st_size > 10_000
    assert section.read_text().strip() == text.strip()
    for model in ("sd-unet", "mmdit"):  # a headline per model and batch: ours vs fp32 and the best peer
        ours = merged["models"][model]["rows"]["diffquant W8A8 naive"]["speedup_vs_fp32"]["1"]
        assert f"- **{model}, batch 1**: diffquant W8A8 naive {ours:.2f}x fp32" in text
    assert text.count("best peer torchao") == 3 and "- **mmdit, batch 2**" not in text
    assert "W4 weight-only" in text and text.count("### ") == 2 and "speedup.png)" in text


def test_section_refuses_a_missing_or_corrupt_result_file_in_one_line(suite, tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"models": ')
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    cases = ((tmp_path / "missing.json", "FileNotFoundError"), (corrupt, "JSONDecodeError"), (other, "'models'"))
    for path, reason in cases:
        with pytest.raises(SystemExit, match=f"is not a result file of this script .*{reason}"):
            suite.write_section([path], tmp_path / "section.md", tmp_path)
    assert not (tmp_path / "section.md").exists() and not (tmp_path / "real.json").exists()


def test_tiny_bf16_variants_run_ours_and_the_peers_int8_mixed_bf16_modes(suite, tmp_path):
    from diffquant.runtime.kernels_int4 import bf16_matmul_supported

    if not bf16_matmul_supported():
        pytest.skip("bf16 compute needs bf16 matrix units (the refusal is tested in test_runtime.py)")
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--batches", "1"]
    variants = ["fp32-eager", "diffquant-w8a8-bf16", "pt2e-bf16"]
    results = suite.main([*argv, "--models", "pixart", "--variants", *variants, "--out", str(tmp_path / "t")])
    rows = results["models"]["pixart"]["rows"]
    ours, peer = rows["diffquant W8A8 naive (bf16 compute)"], rows["pt2e-bf16"]
    assert "skipped" not in ours and "skipped" not in peer, (ours, peer)
    assert 0 < ours["relative_error_vs_fp32"] < 0.1 and 0 < peer["relative_error_vs_fp32"] < 0.1
    assert "onednn::qlinear_pointwise" in ours["notes"][0] and "bf16 autocast" in peer["notes"][0]


def test_a_peer_that_would_not_fit_in_memory_is_skipped_with_the_fix(suite, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "available_memory_mb", lambda: 0.0)  # as when earlier variants filled the RAM
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--models", "pixart"]
    results = suite.main([*argv, "--variants", "fp32-eager", "torchao", "--batches", "1", "--out", str(tmp_path / "m")])
    rows = results["models"]["pixart"]["rows"]
    assert rows["torchao"]["skipped"].startswith("skipped: not enough memory to build it")
    assert "--variants fp32-compiled torchao" in rows["torchao"]["skipped"]
    assert "call_s" in rows["fp32-eager"]  # the rows that fit are still timed and written


def test_attention_kernel_benchmark_times_the_same_attention_everywhere(attention_kernels):
    import torch

    calls = attention_kernels.variants(16, 2, 8, threads=1)
    reference = calls["torch SDPA fp32"]()
    compared = [label for label in calls if "SDPA" in label or "written out" in label]
    assert len(compared) >= 3  # torch fp32/bf16 and the written-out form, OpenVINO's too where installed
    for label in compared:
        out = calls[label]().float()
        assert (out - reference).norm() / reference.norm() < 2e-2, label
    codes = calls["QK^T alone, int8 (_int_mm per head)"]()
    assert codes.dtype == torch.int32 and codes.shape == (2, 16, 16)
    medians = attention_kernels.interleaved({"torch SDPA fp32": calls["torch SDPA fp32"]}, repeats=1)
    assert medians["torch SDPA fp32"] > 0


def test_attention_kernel_benchmark_times_the_openvino_backends_attention_as_simulated(attention_kernels):
    """The four deployed forms (symmetric or zero-point grids, float or 8-bit probabilities) on OpenVINO's
    runtime compute the quantized attention their simulation does, in the models' token layout."""
    import torch

    pytest.importorskip("openvino")
    q = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(0))
    assert len(attention_kernels.INT8_FORMS) == 4
    for label, symmetric, probs_bits in attention_kernels.INT8_FORMS:
        deployed, simulation = attention_kernels.openvino_int8_attention(q, symmetric, probs_bits, threads=1)
        out, reference = deployed().float(), simulation()
        assert out.shape == reference.shape == (1, 16, 16)
        assert (out - reference).norm() / reference.norm() < 2e-2, label  # bf16 around the int8 kernels
    calls = attention_kernels.variants(16, 2, 8, threads=1)
    assert all(label in calls for label, _, _ in attention_kernels.INT8_FORMS)


def test_section_headlines_each_host_apart(suite, tmp_path):
    argv = ["--tiny", "--no-compile", "--threads", "1", "--repeats", "1", "--steps", "0", "--batches", "1"]
    variants = ["--models", "pixart", "--variants", "fp32-eager", "diffquant-w8a8", "torchao", "diffquant-w4"]
    paths = []
    for stem, host in (("intel", "Intel Xeon (AMX)"), ("amd", "AMD EPYC (no AMX)")):
        suite.main([*argv, *variants, "--out", str(tmp_path / stem)])
        path = tmp_path / f"{stem}.json"
        payload = json.loads(path.read_text())
        payload["machine"]["host"] = host  # as two sessions landing on different CPUs
        path.write_text(json.dumps(payload))
        paths.append(path)
    text = suite.write_section(paths, tmp_path / "section.md", tmp_path)
    # ratios never compare across hosts: one headline per host, each against its own run's peer
    assert "- **pixart, Intel Xeon (AMX), batch 1**" in text and "- **pixart, AMD EPYC (no AMX), batch 1**" in text
    assert "in another run" not in text
    assert "Hosts: run 1: Intel Xeon (AMX); run 2: AMD EPYC (no AMX)." in text
    assert "| torchao (run 2) |" in text and text.count(" | 2 |") >= 3  # each row says its run
    # the second host's W4 row (labelled "(run 2)") still makes its headline
    amd = next(line for line in text.splitlines() if line.startswith("- **pixart, AMD EPYC (no AMX), batch 1**"))
    assert "W4 weight-only" in amd


def test_headline_compares_our_best_row_that_has_a_peer_in_its_run(suite):
    rows = {
        "diffquant W8A8 a": {"speedup_vs_fp32": {"1": 3.0}, "run": 1},
        "openvino-bf16": {"speedup_vs_fp32": {"1": 2.5}, "run": 1},
        "diffquant W8A8 a (run 2)": {"speedup_vs_fp32": {"1": 3.5}, "run": 2},  # no peer timed in run 2
    }
    (line,) = suite._headline_lines("m", rows, [1])
    assert "diffquant W8A8 a 3.00x fp32 compiled" in line and "runs at 1.20x it" in line
    assert "(3.50x in a run without a peer)" in line
    del rows["openvino-bf16"]  # no peer anywhere: the fastest row, with no comparison
    (line,) = suite._headline_lines("m", rows, [1])
    assert "(run 2) 3.50x fp32 compiled" in line and "best peer" not in line


def test_attention_kernel_benchmark_refuses_a_zero_thread_count_in_one_line(attention_kernels, capsys):
    with pytest.raises(SystemExit) as stopped:
        attention_kernels.main(["--threads", "0"])
    assert stopped.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


def test_host_label_says_whether_the_cpu_has_amx():
    from diffquant.profiling import available_memory_mb, host_label

    label = host_label()
    if label is None:
        pytest.skip("no /proc/cpuinfo model name here")
    assert label.endswith(("(AMX)", "(no AMX)"))
    assert available_memory_mb() > 0


def test_suite_returns_freed_memory_while_building_and_reuses_it_while_timing(suite):
    import torch

    from diffquant.profiling import malloc_thresholds

    def freed_mb() -> float:  # resident memory a freed 64 MB tensor gives back to the OS
        block = torch.ones(2**24 + 4099)  # an odd size: no free chunk of it is waiting in the heap
        holding = _rss()
        del block
        return holding - _rss()

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc")
    with malloc_thresholds(*suite.BUILD_MALLOC) as applied:
        if not applied:
            pytest.skip("needs glibc")
        while_building = freed_mb()
    with malloc_thresholds(*suite.TIMING_MALLOC):
        while_timing = freed_mb()
    assert while_building > 48 and while_timing < 16


def _rss() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_suite_refuses_a_zero_count_in_one_line(suite, capsys):
    for option in ("--threads", "--repeats", "--calibration", "--mmdit-layers"):
        with pytest.raises(SystemExit) as stopped:
            suite.parse_args([option, "0"])
        assert stopped.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
