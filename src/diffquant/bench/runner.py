"""Run a benchmark matrix, one resumable row at a time (finished rows are never recomputed).

Under `torchrun` / `accelerate launch` the rows are shared out: rank 0 first scores the full-precision
reference rows (and caches their samples), then rank r runs rows r, r + W, r + 2W ... of the matrix on
its own (rows are independent files in OUT/rows), and rank 0 writes results.json once every rank is done.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config
from tqdm.auto import tqdm

import diffquant
from diffquant.bench.coverage import layer_coverage
from diffquant.bench.matrix import CODEBOOK_METHODS, BenchPreset, RowSpec, reference_key
from diffquant.bench.peers import get_peer
from diffquant.bench.report import file_stem, scored_under
from diffquant.bench.token_rows import TokenRows
from diffquant.data.images import to_uint8
from diffquant.errors import DiffquantError
from diffquant.evaluation import Scorer, cached_samples, data_floors, evaluate, get_protocol
from diffquant.families import denoise
from diffquant.fileio import write_json
from diffquant.methods import MethodConfig, make_config
from diffquant.process_group import agree, independent_ranks, init_from_environment, world
from diffquant.profiling import measure_resources
from diffquant.quant import step_context
from diffquant.reporting import directory_megabytes
from diffquant.runtime.export import allow_many_compiled_copies, check_backend, export_model
from diffquant.runtime.kernels_int4 import bf16_matmul_supported
from diffquant.zoo import DiffusionModel
from diffquant.zoo.registry import token_generator_path

GRID_SAMPLES = 8
BARRIER_TIMEOUT_S = 7 * 24 * 3600.0
"""How long ranks wait for each other (the slowest rank's rows of a full preset take many hours)."""


def _parameters(model: DiffusionModel) -> int:
    return sum(p.numel() for p in model.denoiser.parameters())


def _inputs(model: DiffusionModel, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A seeded batch of denoiser inputs; text-conditioned families get their adapter's example conditioning."""
    generator = torch.Generator().manual_seed(0)
    if model.adapter.conditional_inputs:
        x, _, kwargs = model.adapter.example_inputs(model.denoiser, batch, generator)
        return x, torch.full((batch,), 500.0), kwargs
    x = torch.randn((batch, *model.info.image_shape), generator=generator)
    kwargs = {"class_labels": torch.arange(batch) % model.info.num_classes} if model.info.conditional else {}
    return x, torch.full((batch,), 500), kwargs


def _denoiser_directory(path: Path, model: DiffusionModel) -> Path:
    """Where the denoiser's own files are: a pipeline's denoiser component, else the directory itself
    (bits per weight count the denoiser, not the text encoders and autoencoder beside it)."""
    if model.pipeline is not None:
        from diffquant.sampling.pipeline import denoiser_component

        return path / denoiser_component(model.pipeline)
    return path


LATENCY_KEYS = (
    "latency_ms",
    "baseline_ms",
    "speedup",
    "latency_mode",
    "latency_kernels",
    "latency_threads",
    "latency_bf16_ms",
    "speedup_bf16",
    "bf16_relative_difference",
)


def _claim(row_file: Path) -> bool:
    """Mark a row as being run by this process, so that several processes can share one results folder;
    False when another live process on this machine holds it (a dead holder's claim is taken over)."""
    lock = row_file.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(":")
            if host != socket.gethostname() or _alive(int(pid or 0)):
                return False
            lock.unlink(missing_ok=True)  # its process died: take the row over
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(owner)
        return True
    return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _interleaved_latency(
    candidate: torch.nn.Module,
    baseline: torch.nn.Module,
    model: DiffusionModel,
    repeats: int,
    bf16_candidate: torch.nn.Module | None = None,
) -> dict:
    """Median ms of one batch-64 denoiser call, candidate and baseline interleaved; with `bf16_candidate`
    (the same export computing in bfloat16 around its kernels) also its speedup and its relative
    difference from the float32-compute candidate's output."""
    x, t, kwargs = _inputs(model, 64)
    calls = {"candidate": candidate, "baseline": baseline}
    if bf16_candidate is not None:
        calls["bf16"] = bf16_candidate
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad(), step_context(0, 500.0, 50):
        outputs = {name: denoise(module, x, t, kwargs) for name, module in calls.items()}
        for module in calls.values():
            denoise(module, x, t, kwargs)
        for _ in range(repeats):
            for name, module in calls.items():
                started = time.perf_counter()
                denoise(module, x, t, kwargs)
                times[name].append(1000 * (time.perf_counter() - started))
    median = {name: statistics.median(values) for name, values in times.items()}
    timed = {"latency_ms": median["candidate"], "baseline_ms": median["baseline"]}
    timed["speedup"] = median["baseline"] / median["candidate"]
    if bf16_candidate is not None:
        reference = outputs["candidate"]
        timed["latency_bf16_ms"] = median["bf16"]
        timed["speedup_bf16"] = median["baseline"] / median["bf16"]
        timed["bf16_relative_difference"] = ((outputs["bf16"] - reference).norm() / reference.norm()).item()
    return timed


class BenchRunner:
    def __init__(self, preset: BenchPreset, out: Path, num_samples: int | None = None, progress: bool = True) -> None:
        self.preset, self.out, self.progress = preset, Path(out), progress
        self.protocol = get_protocol(preset.protocol, num_samples=num_samples)
        self.scorer = Scorer.load(self.protocol.reference)
        self.rows_dir = self.out / "rows"
        self._models: dict[str, dict[str, Any]] = {}
        self._token_models: dict[str, TokenRows | None] = {}
        allow_many_compiled_copies()  # rows compile many copies: past dynamo's limit they would time eager

    # per-model state ----------------------------------------------------------------------------
    def token_rows(self, name: str) -> TokenRows | None:
        """The adapter that runs a token generator's rows; None for a continuous model."""
        if name not in self._token_models:
            path = token_generator_path(name)
            self._token_models[name] = TokenRows(self, name, path) if path is not None else None
        return self._token_models[name]

    def model_state(self, name: str) -> dict[str, Any]:
        if name not in self._models:
            source = diffquant.load(name)
            reference = cached_samples(source, self.protocol, self.progress)
            state = {"source": source, "reference": reference}
            fp_file = self.rows_dir / f"{reference_key(name)}.json"
            if self.stored_row(fp_file) is None:
                metrics = self.scorer.score(
                    reference, _labels(source, len(reference)), self.protocol.precision_recall_k
                )
                floors = data_floors(self.protocol, self.scorer)
                params = _parameters(source)
                disk = directory_megabytes(_denoiser_directory(source.path, source))
                write_json(
                    fp_file,
                    {
                        "model": name,
                        "protocol": self.protocol.name,
                        "num_samples": self.protocol.num_samples,
                        "method": "fp32",
                        "setting": "W32A32",
                        "family": "reference",
                        "status": "ok",
                        "metrics": metrics,
                        "floors": floors,
                        "disk_mb": disk,
                        "parameters": params,
                        "bits_per_weight": 8e6 * disk / params,
                        "total_mbit": 8 * disk,
                        "grid": self._grid(name, "fp32", reference),
                    },
                )
            self._models[name] = state
        return self._models[name]

    def fp32_compiled(self, name: str) -> torch.nn.Module:
        state = self.model_state(name)
        if "compiled" not in state:
            inductor_config.freezing = True
            try:
                state["compiled"] = torch.compile(copy.deepcopy(state["source"].denoiser))
                x, t, kwargs = _inputs(state["source"], 64)
                with torch.no_grad():
                    denoise(state["compiled"], x, t, kwargs)
            finally:
                inductor_config.freezing = False
        return state["compiled"]

    def peer_batches(self, name: str) -> list:
        state = self.model_state(name)
        if "batches" not in state:
            config = make_config("naive", **self.preset.method_options.get("naive", {}))
            calibration = diffquant.record_calibration(state["source"], config, progress=self.progress)
            order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(0))[:512]
            subset = calibration.subset(order)
            state["batches"] = [
                (b.sample, b.timesteps, b.conditioning)
                for b in subset.shuffled_batches(64, torch.Generator().manual_seed(0))
            ]
        return state["batches"]

    # rows ------------------------------------------------------------------------------------
    def _grid(self, model: str, label: str, images: torch.Tensor) -> str:
        """The first samples of a row as uint8 .npy (same seeds in every row), for side-by-side grids."""
        path = self.out / "grids" / file_stem(model) / f"{label}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, to_uint8(images[:GRID_SAMPLES]).numpy())
        return str(path.relative_to(self.out))

    def method_config(self, spec: RowSpec) -> MethodConfig:
        """The config a diffquant row calibrates with: the bench preset's options, or a named `@preset`."""
        wbits, abits = spec.bits
        # an explicit `@preset` asks for that preset's own defaults, so the bench's options do not apply
        options = {} if spec.method_preset else self.preset.method_options.get(spec.method_name, {})
        return make_config(spec.method_name, spec.method_preset, wbits=wbits, abits=abits, **options)

    def run_row(self, spec: RowSpec) -> dict[str, Any]:
        base = {
            **asdict(spec),
            "protocol": self.protocol.name,
            "num_samples": self.protocol.num_samples,
            "threads": torch.get_num_threads(),
        }
        if (tokens := self.token_rows(spec.model)) is not None:
            return tokens.run_row(spec, base)
        if spec.method_name in CODEBOOK_METHODS:
            return {**base, "status": f"skipped: {spec.method} (codebook weights) runs on token generators only"}
        state = self.model_state(spec.model)
        source: DiffusionModel = state["source"]
        if spec.family == "peer":
            peer = get_peer(spec.method)
            reason = peer.unavailable()
            if reason or spec.setting not in peer.settings:
                reason = reason or peer.missing.get(spec.setting, f"{peer.name} has no {spec.setting} mode")
                return {**base, "status": f"skipped: {reason}"}
            with measure_resources() as usage:
                result = peer.quantize(source.denoiser, spec.setting, self.peer_batches(spec.model))
            candidate = DiffusionModel(
                result.denoiser, source.info, source.scheduler_config, None, None, source.pipeline
            )
            row = {
                **base,
                "version": peer.version(),
                "coverage": {"text": result.coverage},
                "kernels": result.kernels,
                "disk_mb": result.disk_mb,
                "calibration_s": usage.wall_time_s,
                "calibration_peak_rss_mb": usage.peak_rss_mb,
            }
        else:
            config = self.method_config(spec)
            if config.needs_text and "encoder_hidden_states" not in source.adapter.conditioning:
                return {**base, "status": f"skipped: {spec.method_name} quantizes a text conditioning; no text input"}
            reused = self._calibrated_before(spec, config)
            if reused is not None:  # e.g. the same row re-scored at another N: the calibration is not redone
                candidate, calibrated = reused
            else:
                started = time.perf_counter()
                calibration = diffquant.record_calibration(source, config, progress=self.progress)
                recording = time.perf_counter() - started
                candidate = diffquant.quantize(source, config, calibration, progress=self.progress)
                record = candidate.quantization
                directory = diffquant.save(candidate, self.out / "models" / spec.key)
                calibrated = {
                    "disk_mb": directory_megabytes(_denoiser_directory(directory, candidate)),
                    "preset": config.preset,
                    "calibration_s": record["calibration_wall_time_s"] + recording,
                    "calibration_peak_rss_mb": record["calibration_peak_rss_mb"],
                    "calibration_samples": len(calibration),
                    "details": _short(record.get("details", {})),
                }
                # kept beside the model so that a run killed while scoring does not calibrate again
                write_json(self._calibration_record(spec), {**calibrated, "num_samples": self.protocol.num_samples})
            coverage = layer_coverage(candidate.denoiser, source.denoiser)
            row = {**base, "version": diffquant.__version__, "coverage": coverage, **calibrated}
            # scored as deployed: int8 kernels where the layer allows, the compiled simulation elsewhere
            # (tests/test_runtime.py bounds the difference between the two)
            candidate = deployed_model(candidate)
            row["kernels"] = candidate.quantization["kernels"]
            row["evaluated_with"] = f"{candidate.quantization['backend']} backend, torch.compile"

        report = evaluate(candidate, self.protocol, self.scorer, state["reference"], progress=self.progress)
        params = _parameters(source)
        row.update(
            {
                "status": "ok",
                "metrics": report.metrics,
                "bits_per_weight": 8e6 * row["disk_mb"] / params,
                "total_mbit": 8 * row["disk_mb"],
                "grid": self._grid(spec.model, spec.key, report.images),
            }
        )
        if self.preset.latency and (earlier := self._earlier_latency(spec, row)) is not None:
            row.update(earlier)  # the speed of the same kernels does not depend on N: keep the (quiet) timing
        elif self.preset.latency:  # the fp32 baseline is only compiled when a speedup is wanted
            try:
                timed = (
                    self._peer_latency_pair(spec.model, result)
                    if spec.family == "peer"
                    else self._deployed_latency_pair(spec.model, candidate)
                )
                if timed is not None:
                    row.update(self._latency(spec.model, *timed))
            except Exception as error:  # a timing failure must not discard the scored metrics
                row["latency_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return row

    def _earlier_row(self, spec: RowSpec) -> dict[str, Any] | None:
        """The row file's successful earlier run at any protocol or N (what it measured may be reused)."""
        path = self.rows_dir / f"{spec.key}.json"
        row = json.loads(path.read_text()) if path.is_file() else None
        return row if row is not None and row.get("status") == "ok" else None

    def _earlier_latency(self, spec: RowSpec, row: dict[str, Any]) -> dict[str, Any] | None:
        """The speedup an earlier run of this row (e.g. at another N) measured on the very kernels this row
        runs, or None; `--refresh-latency` re-times on purpose."""
        old = self._earlier_row(spec)
        if old is None or "speedup" not in old or old.get("version") != row.get("version"):
            return None
        if old.get("latency_kernels", old.get("kernels")) != json.loads(json.dumps(row.get("kernels"))):
            return None
        return {key: old[key] for key in LATENCY_KEYS if key in old} | {"latency_from_run_with_n": old["num_samples"]}

    def _calibration_record(self, spec: RowSpec) -> Path:
        return self.out / "models" / f"{spec.key}.calibration.json"

    def _calibrated_before(self, spec: RowSpec, config) -> tuple[DiffusionModel, dict[str, Any]] | None:
        """The model an earlier run of this row saved, with its calibration measurements, when it was
        calibrated with the same config (an earlier run at another N, or one killed while scoring)."""
        directory, record = self.out / "models" / spec.key, self._calibration_record(spec)
        old = json.loads(record.read_text()) if record.is_file() else self._earlier_row(spec)
        if not directory.is_dir() or old is None or "calibration_s" not in old:
            return None
        try:
            model = diffquant.load(directory)
        except DiffquantError:
            return None
        if model.quantization.get("config") != json.loads(json.dumps(config.to_json())):
            return None  # the method or its options changed since: calibrate again
        kept = ("disk_mb", "preset", "calibration_s", "calibration_peak_rss_mb", "calibration_samples", "details")
        measured = {key: old[key] for key in kept if key in old}
        return model, {**measured, "calibration_from_run_with_n": old.get("num_samples")}

    # latency ------------------------------------------------------------------------------------
    def _peer_latency_pair(self, model: str, result) -> tuple[torch.nn.Module, torch.nn.Module, str]:
        if result.compiled:
            return result.denoiser, self.fp32_compiled(model), "compiled vs fp32 compiled"
        return result.denoiser, self.model_state(model)["source"].denoiser, "eager vs fp32 eager"

    def _deployed_latency_pair(self, model: str, deployed: DiffusionModel) -> tuple | None:
        """(candidate, baseline, mode) when the deployed model runs int8 kernels; None otherwise."""
        if not any("onednn" in kernel for kernel in deployed.quantization["kernels"]):
            return None
        return deployed.denoiser, self.fp32_compiled(model), "onednn int8 compiled vs fp32 compiled"

    def _latency(
        self,
        model: str,
        candidate: torch.nn.Module,
        baseline: torch.nn.Module,
        mode: str,
        bf16_candidate: torch.nn.Module | None = None,
    ) -> dict:
        source = self.model_state(model)["source"]
        timed = _interleaved_latency(candidate, baseline, source, self.preset.latency_repeats, bf16_candidate)
        return {**timed, "latency_mode": mode}

    def refresh_latency(self, spec: RowSpec) -> dict[str, Any] | None:
        """Re-measure a finished row's latency with the current kernels, without re-sampling: diffquant
        rows reload their saved model, peers quantize again. Meant for a quiet machine, after the
        sample-heavy rows ran side by side."""
        path = self.rows_dir / f"{spec.key}.json"
        row = self.stored_row(path)
        if row is None or row.get("status") != "ok":
            return None
        if self.token_rows(spec.model) is not None:
            return row  # token rows run the simulation: there are no kernels to time
        # a fresh compiler state per row (and a freshly frozen fp32 baseline): compiled graphs left from
        # earlier rows in this process must not be reused for this row's timing
        torch._dynamo.reset()
        for state in self._models.values():
            state.pop("compiled", None)
        try:
            if spec.family == "peer":
                peer = get_peer(spec.method)
                if peer.unavailable():
                    return None
                source = self.model_state(spec.model)["source"]
                result = peer.quantize(source.denoiser, spec.setting, self.peer_batches(spec.model))
                timed, kernels = self._peer_latency_pair(spec.model, result), result.kernels
                bf16 = None
            else:
                quantized = diffquant.load(self.out / "models" / spec.key)
                deployed = deployed_model(quantized)
                timed, kernels = self._deployed_latency_pair(spec.model, deployed), deployed.quantization["kernels"]
                bf16 = self._bf16_export(spec, quantized) if timed is not None else None
            if timed is None:  # nothing runs on real kernels here (e.g. no oneDNN): keep what the row had
                return row
            # the metrics stay those of the row's own run (its `kernels`); the timing says what it timed
            bf16_candidate = None if bf16 is None else bf16.denoiser
            row.update(self._latency(spec.model, *timed, bf16_candidate=bf16_candidate), latency_kernels=kernels)
            row["latency_threads"] = torch.get_num_threads()
        except Exception as error:  # one row must not stop the others; the row keeps its old timing
            tqdm.write(f"{spec.key}: latency not refreshed ({type(error).__name__}: {error})")
            return row
        write_json(path, row)
        return row

    @staticmethod
    def _bf16_export(spec: RowSpec, quantized: DiffusionModel) -> DiffusionModel | None:
        """The bfloat16-compute export to time beside the row's own, where this CPU has bf16 matrix units."""
        if not bf16_matmul_supported():
            return None
        try:
            return deployed_model(quantized, "bfloat16")
        except DiffquantError as error:  # the float32 timing still counts
            tqdm.write(f"{spec.key}: no bfloat16-compute timing ({error})")
            return None

    def stored_row(self, path: Path) -> dict[str, Any] | None:
        """A finished row from an earlier run, or None when absent, failed (retried) or scored under another
        protocol/N."""
        if not path.is_file():
            return None
        row = json.loads(path.read_text())
        if str(row.get("status", "")).startswith("failed"):
            return None
        return row if scored_under(row, self.protocol.name, self.protocol.num_samples) else None

    def finished_rows(self) -> list[dict[str, Any]]:
        """Every row in the results folder scored under this protocol, reference rows first."""
        rows = [row for path in sorted(self.rows_dir.glob("*.json")) if (row := self.stored_row(path))]
        return sorted(rows, key=lambda row: row.get("family") != "reference")

    def run(self, rows: list[RowSpec]) -> list[dict[str, Any]]:
        """Run the unfinished `rows` (this rank's share of them under a process group); returns the
        reference rows and the rows it ran or found finished."""
        rank, world_size = world()
        if world_size > 1:
            failure = None
            if rank == 0:  # the reference rows and cached samples every other row compares with, once
                try:
                    for model in dict.fromkeys(spec.model for spec in rows):
                        self.model_state(model)
                except Exception as error:
                    failure = f"{type(error).__name__}: {error}"
            agree(failure)
            rows = rows[rank::world_size]
        with independent_ranks():  # a row is one rank's work: nothing inside it waits for the others
            results = self._run_rows(rows)
        references = [self.rows_dir / f"{reference_key(m)}.json" for m in self.preset.models]
        fp_rows = [row for path in references if (row := self.stored_row(path))]
        return fp_rows + results

    def _run_rows(self, rows: list[RowSpec]) -> list[dict[str, Any]]:
        results = []
        for spec in tqdm(rows, desc=f"bench {self.preset.name}", disable=not self.progress):
            path = self.rows_dir / f"{spec.key}.json"
            if (stored := self.stored_row(path)) is not None:  # finished in an earlier (maybe interrupted) run
                results.append(stored)
                continue
            if not _claim(path):  # another process sharing this folder is running it
                continue
            try:
                row = self._row_or_failure(spec)
                write_json(path, row)
            finally:  # released only once the row is on disk, so no other process starts it again
                path.with_suffix(".lock").unlink(missing_ok=True)
            results.append(row)
        return results

    def _row_or_failure(self, spec: RowSpec) -> dict[str, Any]:
        try:
            return self.run_row(spec)
        except Exception as error:  # one failing row must not lose the others
            return {
                **asdict(spec),
                "protocol": self.protocol.name,
                "num_samples": self.protocol.num_samples,
                "status": f"failed: {type(error).__name__}: {str(error)[:300]}",
                "traceback": traceback.format_exc()[-2000:],
            }


def deployed_model(quantized: DiffusionModel, compute_dtype: str = "float32") -> DiffusionModel:
    """The quantized model on this machine's fastest backend, compiled (rows are scored in float32 compute;
    `--refresh-latency` also times the bfloat16-compute export)."""
    try:
        check_backend("onednn")
        backend = "onednn"
    except DiffquantError:
        backend = "fake"
        compute_dtype = "float32"
    # weight-only layers decoded at load score exactly as the simulation (the packed bf16 path rounds to bf16)
    return export_model(quantized, backend, compile=True, weight_only_mode="at-load", compute_dtype=compute_dtype)


def _labels(model: DiffusionModel, count: int) -> torch.Tensor | None:
    from diffquant.sampling.sampler import default_labels

    return default_labels(model, count)


def _short(details: dict) -> dict:
    return {k: (v if not isinstance(v, list) or len(v) <= 8 else f"{len(v)} items") for k, v in details.items()}


def run_bench(
    preset: BenchPreset,
    out: str | Path,
    num_samples: int | None = None,
    progress: bool = True,
    run_rows: bool = True,
    refresh_latency: bool = False,
) -> list[dict]:
    """Run (or resume) every row of `preset`; returns every finished row in `out`, reference rows first.

    Rows from earlier runs into the same folder (e.g. restricted with --model/--method) are kept in
    the report as long as they were scored under the same protocol and N. `refresh_latency` re-times
    the finished rows of `preset` instead of running new ones.
    """
    rank, _ = init_from_environment(timeout_s=BARRIER_TIMEOUT_S)
    runner = BenchRunner(preset, Path(out), num_samples, progress and rank == 0)
    if refresh_latency:
        if rank == 0:  # timings want a quiet machine: one process re-times them
            for spec in tqdm(preset.rows(), desc="latency", disable=not progress):
                runner.refresh_latency(spec)
    elif run_rows:
        runner.run(preset.rows())
    agree()  # every rank's rows are on disk
    rows = runner.finished_rows()
    if not rows:
        raise DiffquantError(f"No finished rows in {out}/rows for this protocol and N; run the bench first.")
    if rank == 0:
        payload = {"preset": preset.name, "protocol": runner.protocol.to_json(), "rows": rows}
        write_json(Path(out) / "results.json", payload)
    agree()  # results.json is written before any rank reads it
    return rows


__all__ = ["BenchRunner", "run_bench"]
