"""Calibration data: denoiser inputs recorded along full-precision sampling trajectories.

A `CalibrationSet` holds N denoiser calls: the input x_t, the timestep, the sampling-step index and
any conditioning keyword arguments (class labels, encoder hidden states, SDXL's nested
`added_cond_kwargs`, ...), with the classifier-free-guidance branch recorded as its own entry. It is
saved as safetensors + JSON and reused across methods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.families.base import select_rows
from diffquant.fileio import atomic_directory, ensure_free_space, recover_interrupted

TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"

Conditioning = dict[str, Any]
"""Keyword inputs of the denoiser: batched tensors, or dicts of them (SDXL's `added_cond_kwargs`)."""


def flatten_conditioning(conditioning: Conditioning, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested conditioning as flat dotted keys ("added_cond_kwargs.text_embeds")."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in conditioning.items():
        if isinstance(value, dict):
            flat.update(flatten_conditioning(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            flat[f"{prefix}{key}"] = value
        else:
            raise DiffquantError(
                f"Conditioning '{prefix}{key}' is a {type(value).__name__}; calibration data holds batched tensors "
                "(or dicts of them). Leave constant inputs to the model family's adapter."
            )
    return flat


def unflatten_conditioning(flat: dict[str, torch.Tensor]) -> Conditioning:
    nested: Conditioning = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested




@dataclass
class CalibrationBatch:
    """Inputs of one denoiser call from one sampling step."""

    step_index: int
    timestep: float
    num_steps: int
    sample: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning

    def model_inputs(self) -> tuple[tuple[torch.Tensor, torch.Tensor], Conditioning]:
        return (self.sample, self.timesteps), self.conditioning

    @property
    def size(self) -> int:
        return self.sample.shape[0]


@dataclass
class CalibrationSet:
    """N recorded denoiser inputs, grouped by sampling step when iterated."""

    sample: torch.Tensor
    timestep: torch.Tensor
    step_index: torch.Tensor
    conditioning: Conditioning = field(default_factory=dict)
    num_steps: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return self.sample.shape[0]

    def validate(self) -> None:
        count = self.sample.shape[0]
        if count == 0:
            raise DiffquantError("The calibration set is empty: record at least one sample.")
        tensors = {"sample": self.sample, "timestep": self.timestep, "step_index": self.step_index}
        tensors.update({f"conditioning.{k}": v for k, v in flatten_conditioning(self.conditioning).items()})
        for name, tensor in tensors.items():
            if tensor.shape[0] != count:
                raise DiffquantError(
                    f"Calibration field '{name}' has {tensor.shape[0]} entries but 'sample' has {count}."
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).reshape(count, -1).any(1).sum())
                raise DiffquantError(
                    f"Calibration data has NaN or Inf in '{name}' ({bad} of {count} entries). Re-record it "
                    "from a model that samples finite images, or drop those entries."
                )

    @property
    def steps(self) -> list[int]:
        return sorted(set(self.step_index.tolist()))

    def batches(self, batch_size: int = 64, steps: list[int] | None = None) -> Iterator[CalibrationBatch]:
        """Batches of one sampling step each (per-step quantizers need a single step per call)."""
        for step in steps if steps is not None else self.steps:
            index = torch.nonzero(self.step_index == step).flatten()
            for start in range(0, len(index), batch_size):
                chosen = index[start : start + batch_size]
                yield CalibrationBatch(
                    step_index=step,
                    timestep=float(self.timestep[chosen[0]]),
                    num_steps=self.num_steps,
                    sample=self.sample[chosen],
                    timesteps=self.timestep[chosen],
                    conditioning=select_rows(self.conditioning, chosen),
                )

    def subset(self, index: torch.Tensor) -> CalibrationSet:
        return CalibrationSet(
            self.sample[index],
            self.timestep[index],
            self.step_index[index],
            select_rows(self.conditioning, index),
            self.num_steps,
            dict(self.meta),
        )

    def shuffled_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[CalibrationBatch]:
        """Random mini-batches mixing steps (for reconstruction losses that do not need the step context)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(order), batch_size):
            part = self.subset(order[start : start + batch_size])
            yield CalibrationBatch(-1, float("nan"), self.num_steps, part.sample, part.timestep, part.conditioning)

    # persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the set atomically; an existing `directory` that is not a calibration set (and not
        empty) is refused unless `overwrite`."""
        directory = Path(directory)
        tensors = {"sample": self.sample, "timestep": self.timestep, "step_index": self.step_index}
        tensors.update({f"conditioning.{k}": v for k, v in flatten_conditioning(self.conditioning).items()})
        ensure_free_space(directory.parent, sum(t.numel() * t.element_size() for t in tensors.values()) + 65536)
        with atomic_directory(directory, META_FILE, overwrite) as scratch:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch / TENSORS_FILE))
            meta = {"num_steps": self.num_steps, "count": len(self), **self.meta}
            (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationSet:
        directory = Path(directory)
        recover_interrupted(directory)
        if not (directory / TENSORS_FILE).is_file():
            raise DiffquantError(
                f"{directory} holds no calibration data ({TENSORS_FILE} is missing). "
                "Record it with `diffquant calibrate`."
            )
        try:
            tensors = load_file(str(directory / TENSORS_FILE))
            meta = json.loads((directory / META_FILE).read_text())
        except Exception as error:
            raise DiffquantError(f"Cannot read calibration data in {directory}: {error}. Record it again.") from error
        absent = [key for key in ("sample", "timestep", "step_index") if key not in tensors]
        if absent or not isinstance(meta, dict):
            what = f"lacks the tensor '{absent[0]}'" if absent else f"has a {META_FILE} that is not a JSON object"
            raise DiffquantError(
                f"Calibration data in {directory} {what}; it was not written by diffquant. Record it with "
                "`diffquant calibrate` or build a CalibrationSet(sample, timestep, step_index, ...)."
            )
        flat = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("conditioning.")}
        conditioning = unflatten_conditioning(flat)
        num_steps = meta.pop("num_steps", 1)
        meta.pop("count", None)
        return cls(tensors["sample"], tensors["timestep"], tensors["step_index"], conditioning, num_steps, meta)


def random_subset(calibration: CalibrationSet, size: int, seed: int) -> CalibrationSet:
    """`size` entries drawn without replacement under `seed`, in their original order (all when fewer)."""
    if size >= len(calibration):
        return calibration
    index = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))[:size]
    return calibration.subset(index.sort().values)
