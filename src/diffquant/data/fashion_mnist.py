"""Fashion-MNIST read from the IDX files of the Debian package `dataset-fashion-mnist`.

Nothing is downloaded: install the files with `apt-get install -y dataset-fashion-mnist`, or point
`DIFFQUANT_FASHION_MNIST_DIR` (or the `data_dir` argument) at a folder holding the four IDX files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from diffquant.data.images import ImageSet, to_unit_range
from diffquant.errors import DataNotFoundError, DiffquantError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: 0x0803 = unsigned byte, 3 dimensions; 0x0801 = unsigned byte, 1 dimension.
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def default_fashion_mnist_dir() -> Path:
    """The data directory: $DIFFQUANT_FASHION_MNIST_DIR, else the Debian package's folder."""
    return Path(os.environ.get("DIFFQUANT_FASHION_MNIST_DIR", DEBIAN_DIR))


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' is not in {data_dir}. Install the Debian package with "
        "`sudo apt-get install -y dataset-fashion-mnist`, or set DIFFQUANT_FASHION_MNIST_DIR "
        "to a folder holding the four IDX files."
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    header = np.frombuffer(raw[:4], dtype=">u4")[0]
    if header != magic:
        raise DiffquantError(f"{path} is not an IDX file of the expected kind (magic {header}, want {magic}).")
    ndim = magic & 0xFF
    shape = tuple(int(d) for d in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4"))
    data = np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise DiffquantError(f"{path} is truncated: {data.size} bytes of data for shape {shape}.")
    return data.reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST `split` ('train' or 'test') as (N, 1, 28, 28) float32 in [-1, 1] with labels."""
    if split not in _FILES:
        raise DiffquantError(f"Unknown Fashion-MNIST split '{split}': use 'train' or 'test'.")
    folder = Path(data_dir) if data_dir is not None else default_fashion_mnist_dir()
    image_file, label_file = _FILES[split]
    images = _read_idx(_find(folder, image_file), _IMAGE_MAGIC)
    labels = _read_idx(_find(folder, label_file), _LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DiffquantError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return ImageSet(
        images=to_unit_range(images[:, None]),
        labels=torch.as_tensor(labels.astype(np.int64)),
        num_classes=10,
        name=f"fashion-mnist-{split}",
    )
