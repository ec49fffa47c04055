"""The torch.distributed process group as every layer sees it: which rank this is, its share of the data,
and gradients averaged over the ranks (data-parallel reconstruction).

Without an initialised group (or inside `independent_ranks`) each function is the single-process identity,
so code written against this module runs unchanged in one process. `torchrun` / `accelerate launch`
describe the group in the environment; `init_from_environment` joins it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from diffquant.errors import ConfigError, DiffquantError

_independent = False


def world() -> tuple[int, int]:
    """(rank, world size): from the initialised process group, else (0, 1); (0, 1) in `independent_ranks`."""
    if not _independent and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(backend: str = "gloo", timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun / accelerate launch describe in the environment (if any)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **timeout)
    return world()


def leave() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def independent_ranks() -> Iterator[None]:
    """Each rank works alone inside: the lower layers see one process (no collectives), e.g. while the
    ranks run different benchmark rows."""
    global _independent
    before, _independent = _independent, True
    try:
        yield
    finally:
        _independent = before


def agree(failure: str | None = None) -> None:
    """A barrier that also carries failures: when any rank arrives with one, every rank raises it (instead
    of the others waiting for a rank that will never come)."""
    _, world_size = world()
    if world_size == 1:
        if failure:
            raise DiffquantError(failure)
        return
    failures: list[str | None] = [None] * world_size
    dist.all_gather_object(failures, failure)
    found = [f"rank {rank}: {text}" for rank, text in enumerate(failures) if text]
    if found:
        raise DiffquantError("A process failed: " + "; ".join(found))


@dataclass(frozen=True)
class DataParallel:
    """This process's part in data-parallel optimisation: a disjoint shard of the data, a share of every
    minibatch, its own random rows, and gradients averaged over the ranks before each optimiser step."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DataParallel:
        return cls(*world())

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, groups: torch.Tensor) -> torch.Tensor:
        """Indices of this rank's rows: rows sorted by group (e.g. sampling step) and dealt round-robin, so
        the shards are disjoint, cover every row, and each holds its share of every group."""
        if len(groups) < self.world_size:
            raise ConfigError(
                f"{len(groups)} calibration inputs cannot be split over {self.world_size} processes: record more "
                "calibration data or launch fewer processes."
            )
        order = torch.sort(groups, stable=True).indices
        return order[self.rank :: self.world_size]

    def batch_share(self, batch_size: int) -> int:
        """This rank's rows of a minibatch of `batch_size` (the shares add up to `batch_size`)."""
        if batch_size < self.world_size:
            raise ConfigError(
                f"A minibatch of {batch_size} cannot be split over {self.world_size} processes: raise the "
                "batch size or launch fewer processes."
            )
        return batch_size * (self.rank + 1) // self.world_size - batch_size * self.rank // self.world_size

    def seed(self, seed: int) -> int:
        """A seed for this rank's own draws (rank 0 keeps `seed`)."""
        return seed + 1_000_003 * self.rank

    def average_gradients(self, parameters: Sequence[torch.Tensor], loss: torch.Tensor | None, rows: int) -> float:
        """Replace each gradient by the row-weighted mean over the ranks (the gradient of the whole
        minibatch's mean loss) and return that minibatch's loss. A rank with no rows passes `loss=None`.

        One all-reduce carries every gradient, a has-gradient flag per parameter (a parameter no rank
        touched keeps no gradient, so Adam skips it as in one process) and the loss.
        """
        device = parameters[0].device if parameters else torch.device("cpu")
        parts = []
        for parameter in parameters:
            grad = parameter.grad
            absent = torch.zeros(parameter.numel(), device=device)
            parts.append(absent if grad is None else rows * grad.float().flatten())
        flags = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
        local_loss = 0.0 if loss is None else rows * float(loss.detach())
        buffer = torch.cat([*parts, flags, torch.tensor([local_loss, float(rows)], device=device)])
        dist.all_reduce(buffer)
        total_rows = float(buffer[-1])
        offset = 0
        for index, parameter in enumerate(parameters):
            size = parameter.numel()
            if buffer[-2 - len(parameters) + index] > 0:
                mean = buffer[offset : offset + size] / total_rows
                parameter.grad = mean.view_as(parameter).to(device=parameter.device, dtype=parameter.dtype)
            offset += size
        return float(buffer[-2]) / total_rows


__all__ = ["DataParallel", "agree", "independent_ranks", "init_from_environment", "leave", "world"]
