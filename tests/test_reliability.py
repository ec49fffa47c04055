"""Bad input and faults (issue 14): every probe of RELIABILITY.md, one test each.

CLI cases run the real command line in a subprocess and assert on its stderr and exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import diffquant
from diffquant.calibration import CalibrationSet, UniformSteps, record_trajectories
from diffquant.errors import ConfigError, DiffquantError
from diffquant.fileio import atomic_directory
from diffquant.runtime.storage import QUANTIZATION_FILE, TENSORS_FILE
from diffquant.sampling import SamplerConfig
from diffquant.zoo import save_model
from tests.conftest import tiny_dit_model, tiny_unet_model

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str, cwd: Path | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    if cache is not None:
        env["DIFFQUANT_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-c", "from diffquant.cli import app; app()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr[-2000:]


def small_set(model, trajectories: int = 4, seed: int = 1) -> CalibrationSet:
    sampler = SamplerConfig("ddim", 4)
    return record_trajectories(model, trajectories, sampler, UniformSteps(2), seed=seed, progress=False)


@pytest.fixture(scope="module")
def unet_and_set():
    model = tiny_unet_model()
    return model, small_set(model)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, unet_and_set):
    model, calibration = unet_and_set
    quantized = diffquant.quantize(model, "naive", calibration, progress=False, wbits=4, abits=8)
    return diffquant.save(quantized, tmp_path_factory.mktemp("q") / "w4a8")


def copy_of(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(directory, tmp_path / name))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# 1. outputs: never delete a user's files ------------------------------------------------------------
def test_calibrate_out_keeps_a_foreign_directory(tmp_path):
    folder = tmp_path / "my-project-folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    result = run_cli("calibrate", "--model", "fmnist-unet", "--trajectories", "1", "--out", str(folder))
    assert_one_line_error(result, "not a diffquant output")
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-project-folder"]


def test_save_refuses_a_foreign_directory_unless_overwrite(tmp_path, quantized_dir):
    model = diffquant.load(quantized_dir)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DiffquantError, match="--overwrite"):
        diffquant.save(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    diffquant.save(model, folder, overwrite=True)
    assert (folder / QUANTIZATION_FILE).is_file() and not (folder / "notes.txt").exists()
    diffquant.save(model, folder)  # an output of the same kind is replaced without the flag


def test_out_dot_is_a_clear_error_and_leaves_nothing(tmp_path):
    result = run_cli("calibrate", "--model", "fmnist-unet", "--trajectories", "1", "--out", ".", cwd=tmp_path)
    assert_one_line_error(result, "current directory")
    assert list(tmp_path.iterdir()) == []


def test_parents_of_the_working_directory_are_refused(tmp_path, monkeypatch):
    from diffquant.fileio import check_output

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in ("..", str(tmp_path), "/"):
        with pytest.raises(DiffquantError, match="the current directory, one of its parents"):
            check_output(out, "calibration.json", overwrite=True)


def test_a_crash_between_the_two_renames_restores_the_old_model(tmp_path, quantized_dir):
    target = copy_of(quantized_dir, tmp_path, "model")
    # what a kill -9 between `target -> .target.old-PID` and `scratch -> target` leaves behind
    hidden = tmp_path / f".model.old-{dead_pid()}"
    os.replace(target, hidden)
    scratch = tmp_path / f".model.partial-{dead_pid()}-abcd"
    scratch.mkdir()
    assert not target.exists()
    model = diffquant.load(target)  # the old version is found again
    assert model.quantization["method"] == "naive"
    assert target.is_dir() and not hidden.exists() and not scratch.exists()


def test_stale_leftovers_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    target = tmp_path / "calib"
    dead_partial = tmp_path / f".calib.partial-{dead_pid()}-x1"
    dead_old = tmp_path / f".calib.old-{dead_pid()}"
    live_partial = tmp_path / f".calib.partial-{os.getppid()}-x2"
    for folder in (dead_partial, dead_old, live_partial):
        folder.mkdir()
    target.mkdir()
    (target / "calibration.json").write_text("{}")
    with atomic_directory(target, "calibration.json") as scratch:
        (scratch / "calibration.json").write_text("{}")
    assert not dead_partial.exists() and not dead_old.exists() and live_partial.exists()


def test_a_failed_second_rename_keeps_the_old_directory(tmp_path, monkeypatch):
    from diffquant.fileio import WriteError

    target = tmp_path / "out"
    target.mkdir()
    (target / "calibration.json").write_text('{"old": true}')
    real_replace = os.replace
    calls = []

    def flaky(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr("diffquant.fileio.os.replace", flaky)
    with pytest.raises(WriteError, match="old one is kept"), atomic_directory(target, "calibration.json") as s:
        (s / "calibration.json").write_text('{"new": true}')
    assert json.loads((target / "calibration.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_saved_files_follow_the_umask(tmp_path, quantized_dir):
    previous = os.umask(0o022)
    try:
        out = diffquant.save(diffquant.load(quantized_dir), tmp_path / "saved")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in (QUANTIZATION_FILE, TENSORS_FILE, "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# 2. bad calibration data is refused before any work --------------------------------------------------
def _variant(calibration: CalibrationSet, **changes) -> CalibrationSet:
    fields = {
        "sample": calibration.sample.clone(),
        "timestep": calibration.timestep.clone(),
        "step_index": calibration.step_index.clone(),
        "conditioning": dict(calibration.conditioning),
        "num_steps": calibration.num_steps,
        "meta": dict(calibration.meta),
    }
    fields.update(changes)
    return CalibrationSet(**fields)


def _refused(model, calibration, match: str) -> None:
    with pytest.raises(DiffquantError, match=match):
        diffquant.quantize(model, "naive", calibration, progress=False)


def test_a_single_huge_value_is_refused(unet_and_set):
    model, calibration = unet_and_set
    sample = calibration.sample.clone()
    sample[1, 0, 2, 3] = 1e30
    _refused(model, _variant(calibration, sample=sample), "more than 1000x the spread")


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_a_constant_set_is_refused(unet_and_set, value):
    model, calibration = unet_and_set
    _refused(model, _variant(calibration, sample=torch.full_like(calibration.sample, value)), "constant")


def test_timesteps_outside_the_schedule_are_refused(unet_and_set):
    model, calibration = unet_and_set
    _refused(model, _variant(calibration, timestep=calibration.timestep * 0 + 5000), "trained on 0-999")


def test_another_models_set_is_refused(unet_and_set):
    model, calibration = unet_and_set
    _refused(model, _variant(calibration, meta={**calibration.meta, "model": "fmnist-dit"}), "recorded on 'fmnist-dit'")


def test_a_three_channel_set_is_refused(unet_and_set):
    model, calibration = unet_and_set
    _refused(model, _variant(calibration, sample=calibration.sample.repeat(1, 3, 1, 1)), "3 channels")


def test_a_class_conditional_set_on_an_unconditional_model_is_refused(unet_and_set):
    model, _ = unet_and_set
    dit_set = small_set(tiny_dit_model(), trajectories=2)
    dit_set.meta.pop("model")
    _refused(model, dit_set, "unconditional")


def test_a_good_set_still_quantizes(unet_and_set):
    model, calibration = unet_and_set
    quantized = diffquant.quantize(model, "naive", calibration, progress=False)
    assert quantized.quantization["calibration"]["samples"] == len(calibration)


# 3. what is loaded is verified --------------------------------------------------------------------
def test_a_flipped_byte_fails_to_load(tmp_path, quantized_dir):
    copy = copy_of(quantized_dir, tmp_path)
    payload = bytearray((copy / TENSORS_FILE).read_bytes())
    payload[-100] ^= 0x01
    (copy / TENSORS_FILE).write_bytes(bytes(payload))
    with pytest.raises(DiffquantError, match=f"{TENSORS_FILE} does not match the sha256"):
        diffquant.load(copy)


@pytest.mark.parametrize("edited", ["int8", "int2"])
def test_an_edited_layer_format_fails_to_load(tmp_path, quantized_dir, edited):
    copy = copy_of(quantized_dir, tmp_path)
    record = json.loads((copy / QUANTIZATION_FILE).read_text())
    layer = next(name for name, plan in record["structure"]["layers"].items() if plan["weight"])
    record["structure"]["layers"][layer]["weight"]["format"] = edited
    (copy / QUANTIZATION_FILE).write_text(json.dumps(record))
    with pytest.raises(DiffquantError, match=rf"{QUANTIZATION_FILE}: layer '{layer}' declares format {edited}"):
        diffquant.load(copy)


def test_a_zero_scale_fails_to_load_naming_the_layer(tmp_path, quantized_dir):
    copy = copy_of(quantized_dir, tmp_path)
    tensors = load_file(str(copy / TENSORS_FILE))
    key = next(k for k in sorted(tensors) if k.endswith("weight_quantizer.scale"))
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(copy / TENSORS_FILE))
    record = json.loads((copy / QUANTIZATION_FILE).read_text())
    record.pop("files")  # as an older save without checksums: the scale check itself must catch it
    (copy / QUANTIZATION_FILE).write_text(json.dumps(record))
    layer = key.removesuffix(".weight_quantizer.scale")
    with pytest.raises(DiffquantError, match=rf"layer '{layer}' .*non-positive.*re-quantize"):
        diffquant.load(copy)


@pytest.mark.parametrize("section", ["structure", "packed"])
def test_a_quantization_json_without_a_section_is_a_one_line_error(tmp_path, quantized_dir, section):
    copy = copy_of(quantized_dir, tmp_path)
    record = json.loads((copy / QUANTIZATION_FILE).read_text())
    del record[section]
    (copy / QUANTIZATION_FILE).write_text(json.dumps(record))
    result = run_cli("sample", "--model", str(copy), "-n", "1", "--steps", "1", "--out", str(tmp_path / "s"))
    assert_one_line_error(result, f"has no '{section}' section")


# 4. staying inside directories ----------------------------------------------------------------------
def test_a_traversing_model_name_stays_inside_the_cache(tmp_path, monkeypatch):
    from dataclasses import replace

    from diffquant.methods import make_config

    cache = tmp_path / "deep" / "cache"
    monkeypatch.setenv("DIFFQUANT_CACHE", str(cache))
    model = tiny_unet_model()
    for name in ("../../../elsewhere", str(tmp_path / "absolute")):
        model.info = replace(model.info, name=name)
        config = make_config("naive", calibration={"trajectories": 2, "steps": 2, "uniform_steps": 2})
        diffquant.record_calibration(model, config, progress=False)
    files = [p.resolve() for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(cache.resolve() in p.parents for p in files), files
    assert len(list((cache / "calibration").iterdir())) == 2


def test_cached_samples_key_is_sanitised(tmp_path, monkeypatch):
    from dataclasses import replace

    from diffquant.evaluation.protocol import EvalProtocol, cached_samples

    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFQUANT_CACHE", str(cache))
    model = tiny_unet_model()
    model.info = replace(model.info, name="../../escaped")
    cached_samples(model, EvalProtocol("t", SamplerConfig("ddim", 2), num_samples=10, batch_size=10), progress=False)
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("*escaped*"))
    assert len(list((cache / "samples").iterdir())) == 1


def test_export_refuses_a_symlink_out_of_the_model_directory(tmp_path, quantized_dir):
    from diffquant.runtime.deploy import export_directory

    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    copy = copy_of(quantized_dir, tmp_path)
    (copy / "notes.txt").symlink_to(secret)
    with pytest.raises(DiffquantError, match="symbolic link"):
        export_directory(copy, tmp_path / "exported", "fake")
    assert not (tmp_path / "exported").exists()


# 5. one-line errors instead of tracebacks -----------------------------------------------------------
def test_negative_threads_is_a_one_line_error():
    assert_one_line_error(run_cli("sample", "--model", "fmnist-unet", "--threads", "-3"), "--threads must be")


def test_a_calibration_set_without_step_index_is_a_one_line_error(tmp_path, unet_and_set):
    model, calibration = unet_and_set
    model_dir = save_model(model, tmp_path / "unet")
    folder = calibration.save(tmp_path / "calib")
    tensors = load_file(str(folder / "calibration.safetensors"))
    del tensors["step_index"]
    save_file(tensors, str(folder / "calibration.safetensors"))
    result = run_cli("quantize", "--model", str(model_dir), "--calibration", str(folder), "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "lacks the tensor 'step_index'")


def test_a_three_channel_set_in_the_cli_is_a_one_line_error(tmp_path, unet_and_set):
    model, calibration = unet_and_set
    model_dir = save_model(model, tmp_path / "unet")
    folder = _variant(calibration, sample=calibration.sample.repeat(1, 3, 1, 1)).save(tmp_path / "calib")
    result = run_cli("quantize", "--model", str(model_dir), "--calibration", str(folder), "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "3 channels")
    assert not (tmp_path / "q").exists()


def test_a_model_directory_without_quantization_json_is_a_one_line_error(tmp_path, quantized_dir):
    copy = copy_of(quantized_dir, tmp_path)
    (copy / QUANTIZATION_FILE).unlink()
    result = run_cli("sample", "--model", str(copy), "-n", "1", "--steps", "1", "--out", str(tmp_path / "s"))
    assert_one_line_error(result, "quantization.json")


def test_bad_json_in_a_float_model_directory_is_a_one_line_error(tmp_path):
    folder = save_model(tiny_unet_model(), tmp_path / "unet")
    (folder / "config.json").write_text('{"_class_name": "UNet2DModel",')
    result = run_cli("sample", "--model", str(folder), "-n", "1", "--steps", "1", "--out", str(tmp_path / "s"))
    assert_one_line_error(result, "is not a valid JSON object")


def test_half_precision_inputs_to_a_loaded_quantized_model_run_in_float32(quantized_dir):
    model = diffquant.load(quantized_dir)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        full = model.denoiser(x, torch.tensor([10, 10])).sample
        half = model.denoiser(x.half(), torch.tensor([10, 10])).sample
    assert half.dtype == torch.float32 and torch.allclose(half, model.denoiser(x.half().float(), 10).sample)
    assert full.shape == half.shape


def test_a_three_channel_input_to_an_exported_model_is_a_clear_error(tmp_path, quantized_dir):
    from diffquant.runtime.export import check_backend

    try:
        check_backend("onednn")
        backend = "onednn"
    except DiffquantError:
        backend = "fake"
    from diffquant.runtime.deploy import export_directory

    export_directory(quantized_dir, tmp_path / "exported", backend)
    exported = diffquant.load(tmp_path / "exported")
    with pytest.raises(DiffquantError, match="takes 1-channel inputs"):
        exported.denoiser(torch.randn(2, 3, 8, 8), torch.tensor([10, 10]))


def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch, quantized_dir):
    from diffquant.fileio import WriteError

    model = diffquant.load(quantized_dir)
    monkeypatch.setattr("diffquant.fileio.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(WriteError, match="Not enough disk space"):
        diffquant.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_during_save_is_one_clear_error_and_keeps_the_old_model(tmp_path, monkeypatch, quantized_dir):
    target = copy_of(quantized_dir, tmp_path, "out")
    before = (target / TENSORS_FILE).read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr("diffquant.runtime.storage.save_file", full)
    with pytest.raises(DiffquantError, match="Could not write .*No space left"):
        diffquant.save(diffquant.load(quantized_dir), target)
    assert (target / TENSORS_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# 6. option conflicts --------------------------------------------------------------------------------
def test_wbits_flag_and_option_that_disagree_are_an_error(tmp_path):
    result = run_cli(
        "quantize", "--model", "fmnist-unet", "--wbits", "8", "--option", "wbits=3", "--out", str(tmp_path / "q")
    )
    assert_one_line_error(result, "--wbits 8 and --option wbits=3 disagree")


def test_a_keep_fp_pattern_matching_nothing_fails_before_recording(monkeypatch, unet_and_set):
    model, _ = unet_and_set

    def not_reached(*args, **kwargs):
        raise AssertionError("calibration was recorded before the pattern was checked")

    monkeypatch.setattr("diffquant.api.record_calibration", not_reached)
    with pytest.raises(ConfigError, match="'nope.\\*' \\(keep_fp\\) matches no quantizable module"):
        diffquant.quantize(model, "naive", progress=False, keep_fp=("nope.*",))


def test_unwritable_or_directory_targets_are_one_clear_error(tmp_path):
    from diffquant.fileio import WriteError, write_json

    with pytest.raises(DiffquantError, match="is a directory; give a file name"):
        write_json(tmp_path, {"a": 1})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match="Cannot create"), atomic_directory(blocker / "out"):
        pass


def test_a_cache_without_room_is_skipped_with_a_warning_before_recording(tmp_path, monkeypatch):
    from diffquant.methods import make_config

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("diffquant.fileio.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    config = make_config("naive", calibration={"trajectories": 2, "steps": 2, "uniform_steps": 2})
    with pytest.warns(UserWarning, match="will not be cached: Not enough disk space"):
        calibration = diffquant.record_calibration(tiny_unet_model(), config, progress=False)
    assert len(calibration) == 4 and not (tmp_path / "cache" / "calibration").exists()


def test_an_empty_cache_variable_means_the_default_cache_not_the_working_directory(monkeypatch, tmp_path):
    from diffquant.cache import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIFFQUANT_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "diffquant"
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
