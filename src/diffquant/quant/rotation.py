"""Hadamard rotations (QuaRot, Ashkboos et al. 2024): spread activation outliers over all channels.

For an orthogonal H, x W^T = (x H)(W H)^T, so rotating a layer's input channels and its weight's input
channels leaves the float output unchanged while making both far easier to quantize. Channel counts
that are not a power of two use a block-diagonal Hadamard matrix whose blocks are the largest power
of two dividing the count (still orthogonal; mixes within blocks only).
"""

from __future__ import annotations

import torch

from diffquant.errors import ConfigError


def hadamard(size: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of a power-of-two `size` (orthogonal, entries +-1/sqrt(n))."""
    if size < 1 or size & (size - 1):
        raise ConfigError(f"A Sylvester Hadamard matrix needs a power-of-two size, got {size}.")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def rotation_matrix(channels: int) -> torch.Tensor:
    """An orthogonal (channels x channels) float32 rotation: block-diagonal Hadamard blocks."""
    if channels < 1:
        raise ConfigError(f"Cannot rotate {channels} channels.")
    block = channels & -channels  # the largest power of two dividing `channels`
    return torch.block_diag(*[hadamard(block)] * (channels // block)).float()


def rotate_input(x: torch.Tensor, rotation: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """x with its channel axis multiplied by `rotation` (x' = x H along that axis)."""
    return torch.movedim(torch.movedim(x, channel_axis, -1) @ rotation.to(x.dtype), -1, channel_axis)


def rotate_weight(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """W H on the input-channel axis (axis 1) of a linear or conv weight."""
    return torch.movedim(torch.movedim(weight, 1, -1) @ rotation.to(weight.dtype), -1, 1)
