"""The benchmark's adapter for token generators (fmnist-vq): the same rows, scores and files as the
continuous models, with the token pillar's sampler, calibration and quantization underneath.

Scored under the bench protocol's N, seed, batch size, reference set and Scorer; sampled with the
generator's own sampler (MaskGIT 8 steps, CFG 2.0 for fmnist-vq) instead of the protocol's scheduler.
Each row records that sampler. Rows are evaluated on the fake-quantization simulation in eager mode:
token denoisers have no real-kernel export yet, so no speedup is measured.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import diffquant
from diffquant.bench.coverage import layer_coverage
from diffquant.bench.matrix import CODEBOOK_METHODS, RowSpec, reference_key
from diffquant.calibration import CalibrationSet
from diffquant.evaluation import data_floors
from diffquant.fileio import write_json
from diffquant.modules.codebook import CodebookLinear, save_codebook_state
from diffquant.profiling import measure_resources
from diffquant.quant.codebook import CodebookSpec
from diffquant.reporting import directory_megabytes
from diffquant.tokens.evaluation import cached_token_samples, evaluate_token_generator
from diffquant.tokens.generator import TokenGenerator
from diffquant.tokens.quantization import quantize_token_denoiser, record_token_calibration, vq_token_denoiser
from diffquant.tokens.storage import save_quantized_token_denoiser

MAX_CALIBRATION_RUNS = 256
"""Full-precision sampling runs recorded for a method (its `calibration.trajectories`, capped): every run
gives all of the sampler's network calls, CFG branches apart, so 256 runs are 4096 inputs at 8 steps."""
CODEBOOK_SPEC = CodebookSpec(refine_steps=100, kmeans_iters=15)
"""2 bits per weight (d=4, K=256) with VQ4DiT's candidate refinement, as in the model card's table."""
CODEBOOK_CALIBRATION_RUNS = 64
EVALUATED_WITH = "fake-quant simulation, eager (token denoisers have no real-kernel export yet)"


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TokenRows:
    """Rows of one token generator, written into the runner's results folder like any other model's."""

    def __init__(self, runner: Any, name: str, path: Path) -> None:
        # runner: the bench.runner.BenchRunner that owns these rows (not imported: it imports this module)
        self.runner, self.name = runner, name
        self.generator = TokenGenerator.load(path)
        self.path = path
        self._reference: torch.Tensor | None = None
        self._calibrations: dict[int, tuple[CalibrationSet, float]] = {}

    # the full-precision reference -------------------------------------------------------------
    def reference(self) -> torch.Tensor:
        """The fp32 generator's protocol samples (cached on disk); writes its fp32 row the first time."""
        if self._reference is None:
            runner = self.runner
            self._reference = cached_token_samples(self.generator, runner.protocol)
            fp_file = runner.rows_dir / f"{reference_key(self.name)}.json"
            if runner.stored_row(fp_file) is None:
                write_json(fp_file, self._fp32_row(self._reference))
        return self._reference

    def _fp32_row(self, images: torch.Tensor) -> dict[str, Any]:
        runner, denoiser = self.runner, self.generator.denoiser
        labels = torch.arange(len(images)) % self.generator.num_classes  # what `generate` sampled them with
        metrics = runner.scorer.score(images, labels, runner.protocol.precision_recall_k)
        metrics["network_calls"] = self.generator.sampler.network_calls(denoiser.config.num_tokens)
        disk, params = directory_megabytes(self.path / "denoiser"), _parameters(denoiser)
        return {
            "model": self.name,
            "protocol": runner.protocol.name,
            "num_samples": runner.protocol.num_samples,
            "method": "fp32",
            "setting": "W32A32",
            "family": "reference",
            "status": "ok",
            "sampler": asdict(self.generator.sampler),
            "metrics": metrics,
            "floors": data_floors(runner.protocol, runner.scorer),
            "disk_mb": disk,
            "parameters": params,
            "bits_per_weight": 8e6 * disk / params,
            "total_mbit": 8 * disk,
            "grid": runner._grid(self.name, "fp32", images),
        }

    # rows ------------------------------------------------------------------------------------
    def run_row(self, spec: RowSpec, base: dict[str, Any]) -> dict[str, Any]:
        if spec.family == "peer":
            return {**base, "status": "skipped: peers quantize diffusers denoisers; a token denoiser is not one"}
        if spec.method_name in CODEBOOK_METHODS:
            quantized, measured = self._codebook(spec)
        else:
            config = self.runner.method_config(spec)
            if config.needs_text:
                return {**base, "status": f"skipped: {spec.method_name} quantizes a text conditioning; no text input"}
            quantized, measured = self._method(spec, config)
        reference = self.reference()
        candidate = TokenGenerator(self.generator.tokenizer, quantized, self.generator.name, self.generator.sampler)
        runner = self.runner
        report = evaluate_token_generator(candidate, runner.protocol, runner.scorer, reference)
        params = _parameters(self.generator.denoiser)
        return {
            **base,
            "version": diffquant.__version__,
            **measured,
            "sampler": asdict(self.generator.sampler),
            "evaluated_with": EVALUATED_WITH,
            "status": "ok",
            "metrics": report.metrics,
            "bits_per_weight": 8e6 * measured["disk_mb"] / params,
            "total_mbit": 8 * measured["disk_mb"],
            "grid": runner._grid(self.name, spec.key, report.images),
        }

    def _calibration(self, runs: int) -> tuple[CalibrationSet, float]:
        """Every network input of `runs` full-precision sampling runs, and the seconds recording took."""
        if runs not in self._calibrations:
            started = time.perf_counter()
            calibration = record_token_calibration(self.generator.denoiser, self.generator.sampler, runs)
            self._calibrations[runs] = (calibration, time.perf_counter() - started)
        return self._calibrations[runs]

    def _method(self, spec: RowSpec, config) -> tuple[torch.nn.Module, dict[str, Any]]:
        runs = min(config.calibration.trajectories, MAX_CALIBRATION_RUNS)
        calibration, recording_s = self._calibration(runs)
        with measure_resources() as usage:
            quantized = quantize_token_denoiser(self.generator.denoiser, config, calibration, self.runner.progress)
        directory = save_quantized_token_denoiser(
            quantized, self.runner.out / "models" / spec.key, {"method": config.to_json()}
        )
        return quantized, {
            "coverage": layer_coverage(quantized, self.generator.denoiser),
            "disk_mb": directory_megabytes(directory),
            "preset": config.preset,
            "calibration_s": recording_s + usage.wall_time_s,
            "calibration_peak_rss_mb": usage.peak_rss_mb,
            "calibration_samples": len(calibration),
            "details": {"calibration_runs": runs},
        }

    def _codebook(self, spec: RowSpec) -> tuple[torch.nn.Module, dict[str, Any]]:
        calibration, recording_s = self._calibration(CODEBOOK_CALIBRATION_RUNS)
        with measure_resources() as usage:
            quantized, size = vq_token_denoiser(self.generator.denoiser, CODEBOOK_SPEC, calibration)
        path = self.runner.out / "models" / spec.key / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_codebook_state(quantized, path)
        layers = sum(isinstance(m, CodebookLinear) for m in quantized.modules())
        linears = sum(isinstance(m, torch.nn.Linear) for m in self.generator.denoiser.modules())
        return quantized, {
            "coverage": {"text": f"{layers}/{linears} linear as 2-bit codebooks", "counts": {"codebook": layers}},
            "disk_mb": directory_megabytes(path.parent),
            "preset": "vq4dit",
            "calibration_s": recording_s + usage.wall_time_s,
            "calibration_peak_rss_mb": usage.peak_rss_mb,
            "calibration_samples": len(calibration),
            "details": {"codebook": asdict(CODEBOOK_SPEC), "compression": size.get("compression")},
        }
