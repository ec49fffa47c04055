"""scikit-learn's 8x8 digits (1,797 images): a tiny second dataset for fast tests."""

from __future__ import annotations

import numpy as np
import torch

from diffquant.data.images import ImageSet


def load_digits() -> ImageSet:
    """The digits as (N, 1, 8, 8) float32 in [-1, 1]; sklearn's pixels run 0..16."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = bunch.images.astype(np.float32) / 16.0
    return ImageSet(
        images=torch.from_numpy(pixels[:, None] * 2.0 - 1.0),
        labels=torch.as_tensor(bunch.target.astype(np.int64)),
        num_classes=10,
        name="sklearn-digits",
    )
