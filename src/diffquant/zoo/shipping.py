"""Ship a trained reference model into the package: weights, sample grid, metrics and model card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from diffquant.errors import DiffquantError
from diffquant.evaluation import Scorer, data_floors, evaluate
from diffquant.evaluation.protocol import EvalProtocol
from diffquant.fileio import atomic_directory, write_json
from diffquant.sampling import SamplerConfig, sample, save_image_grid
from diffquant.zoo.registry import WEIGHTS_DIR, load_model

GRID_FILE = "samples.png"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def _directory_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def reproducing_command(command: str, steps: int) -> str:
    """The training command with `--steps` set to the steps actually trained (a run may stop early)."""
    if re.search(r"--steps[ =]\d+", command):
        return re.sub(r"--steps[ =]\d+", f"--steps {steps}", command)
    return f"{command} --steps {steps}"


def ship_model(name: str, run_dir: Path, protocol: EvalProtocol, progress: bool = True) -> dict[str, Any]:
    """Copy `run_dir/model` to the shipped weights folder with an 8x8 grid, metrics.json and a model card."""
    model_dir, checkpoint_meta = run_dir / "model", run_dir / "checkpoint" / "state.json"
    if not (model_dir / "config.json").is_file() or not checkpoint_meta.is_file():
        raise DiffquantError(f"{run_dir} holds no finished training run (model/ and checkpoint/ are needed).")
    training = json.loads(checkpoint_meta.read_text())
    model = load_model(model_dir)
    scorer = Scorer.load(protocol.reference)
    report = evaluate(model, protocol, scorer, progress=progress)
    floors = data_floors(protocol, scorer)
    grid = sample(model, 64, SamplerConfig("ddim", 50), seed=0, progress=False)
    parameters = sum(p.numel() for p in model.denoiser.parameters())
    payload = {
        "model": name,
        "description": model.info.description,
        "parameters": parameters,
        "protocol": protocol.to_json(),
        "metrics": report.metrics,
        "floors": floors,
        "training": {
            "command": reproducing_command(training["command"], training["step"]),
            "steps": training["step"],
            "wall_time_s": round(training["wall_time_s"], 1),
            "config": training["config"],
            "final_loss": training["history"][-1]["loss"] if training["history"] else None,
        },
    }
    target = WEIGHTS_DIR / name
    with atomic_directory(target) as scratch:
        for item in model_dir.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, scratch / item.name)
        save_image_grid(grid.images, scratch / GRID_FILE, columns=8)
        payload["disk_mb"] = round(_directory_megabytes(scratch), 2)
        write_json(scratch / METRICS_FILE, payload)
        (scratch / CARD_FILE).write_text(model_card(payload, protocol, grid_labels=grid.labels is not None))
    return payload


def model_card(payload: dict[str, Any], protocol: EvalProtocol, grid_labels: bool) -> str:
    training, metrics, floors = payload["training"], payload["metrics"], payload["floors"]
    config = training["config"]
    rows = [
        ("FID", "fid", ".2f"),
        ("sFID", "sfid", ".2f"),
        ("IS (classifier)", "is", ".2f"),
        ("precision", "precision", ".3f"),
        ("recall", "recall", ".3f"),
    ]
    if "class_accuracy" in metrics:
        rows.append(("class accuracy of samples", "class_accuracy", ".3f"))
    table = "\n".join(
        f"| {label} | {metrics[key]:{fmt}} | {floors[key]:{fmt}} |" for label, key, fmt in rows if key in floors
    )
    grid_note = " Row r, column c shows class (8r + c) mod 10." if grid_labels else ""
    return f"""# {payload["model"]}

{payload["description"]} A diffquant reference model, trained by us on Fashion-MNIST
(Debian package `dataset-fashion-mnist`, 60,000 training images).

| | |
|---|---|
| parameters | {payload["parameters"]:,} |
| size on disk | {payload["disk_mb"]} MB (fp32 safetensors + configs) |
| training steps | {training["steps"]:,} (batch {config["batch_size"]}, AdamW lr {config["learning_rate"]}, \
warm-up {config["warmup_steps"]}, EMA {config["ema_decay"]}) |
| training wall time | {training["wall_time_s"] / 3600:.2f} h on 2 CPU cores (1 torch thread, shared machine) |
| final training loss | {training["final_loss"]:.4f} (epsilon MSE) |

Exact training command (resumable; rerun it to continue from the last checkpoint):

```bash
{training["command"]}
```

## Evaluation

Protocol: {protocol.describe()}. Metrics on the shipped Fashion-MNIST feature network
(`diffquant/evaluation/weights/fmnist-features.json`). The floor column scores N real training
images against the same reference: the best any model can reach at this N.

| metric | model | floor (real train images) |
|---|---|---|
{table}

Reproduce: `diffquant eval --model {payload["model"]} --protocol {protocol.name} --floors`

## Samples

![samples]({GRID_FILE})

64 samples, DDIM 50 steps, seed 0.{grid_note}
"""
