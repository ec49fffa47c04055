"""Datasets: Fashion-MNIST from the Debian package and scikit-learn's 8x8 digits."""

from diffquant.data.digits import load_digits
from diffquant.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    default_fashion_mnist_dir,
    load_fashion_mnist,
)
from diffquant.data.images import ImageSet, to_uint8, to_unit_range

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ImageSet",
    "default_fashion_mnist_dir",
    "load_digits",
    "load_fashion_mnist",
    "to_uint8",
    "to_unit_range",
]
