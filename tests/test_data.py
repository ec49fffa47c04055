import gzip
import shutil

import pytest
import torch

from diffquant.data import FASHION_MNIST_CLASSES, load_digits, load_fashion_mnist
from diffquant.data.fashion_mnist import default_fashion_mnist_dir
from diffquant.errors import DataNotFoundError, DiffquantError
from tests.conftest import needs_fmnist


@needs_fmnist
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_counts_dtype(split, count):
    data = load_fashion_mnist(split)
    assert data.images.shape == (count, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.labels.dtype == torch.int64
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert torch.bincount(data.labels).tolist() == [count // 10] * 10
    assert len(FASHION_MNIST_CLASSES) == data.num_classes


def test_missing_data_names_the_debian_package(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_environment_variable_selects_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_FASHION_MNIST_DIR", str(tmp_path))
    assert default_fashion_mnist_dir() == tmp_path
    with pytest.raises(DataNotFoundError):
        load_fashion_mnist("test")


@needs_fmnist
def test_truncated_idx_file_is_a_clear_error(tmp_path):
    source = default_fashion_mnist_dir()
    for name in ("t10k-labels-idx1-ubyte.gz",):
        shutil.copy(source / name, tmp_path / name)
    with gzip.open(source / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        raw = handle.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(raw[: len(raw) // 2])
    with pytest.raises(DiffquantError, match="truncated"):
        load_fashion_mnist("test", tmp_path)


def test_unknown_split():
    with pytest.raises(DiffquantError, match="'train' or 'test'"):
        load_fashion_mnist("validation")


def test_digits():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert set(data.labels.tolist()) == set(range(10))
    assert len(data.subset(100, seed=1)) == 100
    assert torch.equal(data.subset(100, seed=1).images, data.subset(100, seed=1).images)
