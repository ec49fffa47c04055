"""Row-addressable storage of cached block inputs/outputs, in memory or memory-mapped on disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


class TensorStore:
    """N rows of several named float tensors. With `directory`, rows live in .npy memory maps there
    (for calibration sets larger than RAM); otherwise in memory. Random row access either way."""

    def __init__(self, count: int, directory: Path | None = None) -> None:
        self.count = count
        self.directory = Path(tempfile.mkdtemp(prefix="store-", dir=directory)) if directory is not None else None
        self.columns: dict[str, torch.Tensor | np.memmap] = {}
        self.filled = 0

    def _allocate(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        shape = (self.count, *row_shape)
        if self.directory is None:
            self.columns[name] = torch.empty(shape, dtype=dtype)
        else:
            numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
            path = self.directory / f"{name.replace('/', '_')}.npy"
            self.columns[name] = np.lib.format.open_memmap(path, mode="w+", dtype=numpy_dtype, shape=shape)

    def append(self, tensors: dict[str, torch.Tensor]) -> None:
        rows = next(iter(tensors.values())).shape[0]
        for name, value in tensors.items():
            if name not in self.columns:
                self._allocate(name, tuple(value.shape[1:]), value.dtype)
            column = self.columns[name]
            chunk = value.detach()
            if isinstance(column, torch.Tensor):
                column[self.filled : self.filled + rows] = chunk
            else:
                column[self.filled : self.filled + rows] = chunk.numpy()
        self.filled += rows

    def rows(self, index: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        chosen = {}
        for name in names or list(self.columns):
            column = self.columns[name]
            if isinstance(column, torch.Tensor):
                chosen[name] = column[index]
            else:
                chosen[name] = torch.from_numpy(np.ascontiguousarray(column[np.sort(index.numpy())]))[
                    torch.argsort(torch.argsort(index))
                ]
        return chosen

    def __len__(self) -> int:
        return self.filled

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(c.shape)) * c.dtype.itemsize for c in self.columns.values())

    def close(self) -> None:
        self.columns.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
