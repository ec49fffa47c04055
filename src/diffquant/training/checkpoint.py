"""Training checkpoints as safetensors + JSON (no pickle), holding everything an exact resume needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_directory

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into named tensors and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, slots in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically, replacing the previous one."""
    with atomic_directory(directory) as scratch:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch / TENSORS_FILE))
        (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors_file, meta_file = directory / TENSORS_FILE, directory / META_FILE
    if not (tensors_file.is_file() and meta_file.is_file()):
        raise DiffquantError(f"{directory} is not a diffquant training checkpoint (missing {TENSORS_FILE}).")
    try:
        return load_file(str(tensors_file)), json.loads(meta_file.read_text())
    except Exception as error:  # a truncated or foreign file
        raise DiffquantError(f"Cannot read the checkpoint in {directory}: {error}. Delete it to start over.") from error
