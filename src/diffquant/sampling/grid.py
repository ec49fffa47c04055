"""Image grids as PNG, without torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffquant.data.images import to_uint8
from diffquant.fileio import atomic_file


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2, scale: int = 2) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, `scale`x enlarged (nearest)."""
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    canvas = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[i]
    picture = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 2) -> Path:
    with atomic_file(path) as scratch:
        image_grid(images, columns, scale=scale).save(scratch, format="PNG")
    return Path(path)
