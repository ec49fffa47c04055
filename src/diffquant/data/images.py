"""An in-memory labelled image set and the pixel-range conversions every model shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSet:
    """Images as float32 in [-1, 1] with shape (N, C, H, W), plus int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, count: int, seed: int = 0) -> ImageSet:
        """A random subset of `count` images, reproducible for a seed."""
        if count >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageSet(self.images[index], self.labels[index], self.num_classes, self.name)


def to_unit_range(uint8_images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] to float32 in [-1, 1], the range the diffusion models use."""
    tensor = torch.as_tensor(np.array(uint8_images), dtype=torch.float32)
    return tensor / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] to uint8 in [0, 255] (clamped, rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
