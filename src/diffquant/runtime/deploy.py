"""Exported model directories: a quantized directory plus `export.json` naming its backend.

`export_directory` converts a quantized model to a backend, checks the real kernels against the
fake-quantized simulation on probe inputs, and writes the directory; `diffquant.load` on it returns
the model already running on that backend.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from diffquant.errors import DiffquantError
from diffquant.families import denoise
from diffquant.fileio import atomic_directory, check_output, write_json
from diffquant.model import DiffusionModel
from diffquant.quant import step_context
from diffquant.runtime.backends import BACKEND_CLASSES, get_backend, needs_compile
from diffquant.runtime.export import COMPUTE_DTYPES, DEFAULT_WEIGHT_ONLY_MODE, export_model
from diffquant.runtime.storage import load_quantized

EXPORT_FILE = "export.json"


def probe_inputs(model: DiffusionModel, count: int = 8, seed: int = 0) -> list[tuple[int, float, tuple, dict]]:
    """(step index, timestep, args, kwargs) of denoiser calls at a few timesteps, for agreement checks."""
    generator = torch.Generator().manual_seed(seed)
    calls = []
    adapter = model.adapter
    for index, timestep in enumerate((900.0, 500.0, 100.0)):
        if adapter.name not in ("unet2d", "dit"):  # text-conditioned or packed families: the adapter's inputs
            x, _, kwargs = adapter.example_inputs(model.denoiser, count, generator)
            calls.append((index, float(timestep), (x, torch.full((count,), timestep)), kwargs))
            continue
        x = torch.randn((count, *model.info.image_shape), generator=generator)
        t = torch.full((count,), int(timestep))
        kwargs = {}
        if model.info.conditional:
            kwargs["class_labels"] = torch.randint(0, model.info.num_classes, (count,), generator=generator)
        calls.append((index, float(timestep), (x, t), kwargs))
    return calls


def probe_calls(model: DiffusionModel) -> list[dict[str, Any]]:
    """Keyword arguments of two probe calls at different batch sizes (8 and 3), as the family adapter
    passes them: what a backend converts a graph from and checks it on."""
    calls = []
    for count in (8, 3):
        _, _, (x, t), kwargs = probe_inputs(model, count)[0]
        calls.append(model.adapter.call_arguments(model.denoiser, x, t, kwargs))
    return calls


@torch.no_grad()
def agreement_with_simulation(simulated: DiffusionModel, deployed: DiffusionModel) -> dict[str, float]:
    """Max relative error and relative MSE of the deployed model's outputs against the simulation."""
    worst, errors, norms = 0.0, 0.0, 0.0
    for index, timestep, args, kwargs in probe_inputs(simulated):
        with step_context(index, timestep, 50):
            reference = denoise(simulated.denoiser, *args, kwargs)  # by keyword, through the family adapter
            candidate = denoise(deployed.denoiser, *args, kwargs)
        worst = max(worst, ((candidate - reference).abs().max() / reference.abs().max()).item())
        errors += (candidate - reference).pow(2).sum().item()
        norms += reference.pow(2).sum().item()
    return {"max_relative_error": worst, "relative_mse": errors / norms}


def export_directory(
    source: str | Path,
    out: str | Path,
    backend: str,
    compile: bool = False,
    weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE,
    overwrite: bool = False,
    compute_dtype: str = "float32",
) -> dict[str, Any]:
    """Export the quantized directory `source` to `backend`, verify it, and write `out`."""
    check_output(out, EXPORT_FILE, overwrite)
    _refuse_outside_links(Path(source))
    simulated = load_quantized(source)
    # a backend whose kernels inductor lowers has them only compiled: check those, not the float emulation
    deployed = export_model(
        simulated,
        backend,
        compile=needs_compile(backend),
        weight_only_mode=weight_only_mode,
        compute_dtype=compute_dtype,
    )
    report = {
        "backend": backend,
        "compile": compile,
        "weight_only_mode": weight_only_mode,
        "compute_dtype": compute_dtype,
        "kernels": deployed.quantization["kernels"],
        "agreement": agreement_with_simulation(simulated, deployed),
    }
    with atomic_directory(out, EXPORT_FILE, overwrite) as scratch:
        # an exported directory exported again: its backend's own files are not the new backend's
        skipped = {EXPORT_FILE, *(name for kind in BACKEND_CLASSES.values() for name in kind.written_files)}
        for item in Path(source).iterdir():
            if item.name not in skipped:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, scratch / item.name)
        target = get_backend(backend)
        if target.written_files:  # the probe calls are only needed to write (and check) those files
            report.update(target.write_files(deployed.denoiser, probe_calls(simulated), scratch))
        write_json(scratch / EXPORT_FILE, report)
    return report


def _refuse_outside_links(source: Path) -> None:
    """A symlink in a model directory must not turn into a copy of a file from elsewhere."""
    root = source.resolve()
    for item in source.rglob("*"):
        if item.is_symlink() and not item.resolve().is_relative_to(root):
            raise DiffquantError(
                f"{item} is a symbolic link to {item.resolve()}, outside the model directory; export copies only "
                "files inside it. Remove the link (or replace it by a copy) and export again."
            )


def load_exported(directory: str | Path) -> DiffusionModel:
    """A directory written by `export_directory`, running on its backend."""
    directory = Path(directory)
    try:
        report = json.loads((directory / EXPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DiffquantError(f"{directory / EXPORT_FILE} is unreadable: {error}.") from error
    compute_dtype = report.get("compute_dtype", "float32")
    if compute_dtype not in COMPUTE_DTYPES:  # a hand-edited or foreign file: say which one, not torch's error
        raise DiffquantError(
            f"{directory / EXPORT_FILE} names compute_dtype '{compute_dtype}'; it must be one of "
            f"{', '.join(COMPUTE_DTYPES)}. Export the model again with diffquant export."
        )
    backend, compile = report.get("backend"), report.get("compile", False)
    if needs_compile(backend) and not compile:  # a hand-edited file
        raise DiffquantError(
            f"{directory / EXPORT_FILE} names the {backend} backend without compile; its int8 kernels exist only "
            'compiled. Set "compile": true there, or export the model again with --compile.'
        )
    model = load_quantized(directory)
    return export_model(
        model,
        report["backend"],
        report.get("compile", False),
        report.get("weight_only_mode", DEFAULT_WEIGHT_ONLY_MODE),
        compute_dtype=compute_dtype,
    )
