"""Granularities: which elements share one scale. Every quantizer works on a 2-D grouped view.

`group_view(x, g)` reshapes a tensor to (G, n) so that each row holds the elements of one group;
`ungroup(view, x.shape, g)` undoes it. Scales then have shape (G, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError

KINDS = ("per_tensor", "per_channel", "per_token", "group", "token_group")


@dataclass(frozen=True)
class Granularity:
    """per_tensor; per_channel along `axis` (negative counts from the end); per_token (one scale per row
    over the last/channel axis);
    group: `group_size` consecutive input channels per scale (on weights: along the flattened
    reduction dimension of the layer, as in the GEMM it feeds); token_group: `group_size` consecutive
    channels of one token per scale (activations; SVDQuant's dynamic per-token group-64 inputs)."""

    kind: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Unknown granularity '{self.kind}'. Choose one of: {', '.join(KINDS)}.")
        if self.kind in ("group", "token_group") and (self.group_size is None or self.group_size <= 0):
            raise ConfigError(f"Group granularity needs a positive group_size, got {self.group_size}.")

    def describe(self) -> str:
        if self.kind == "group":
            return f"group{self.group_size}"
        if self.kind == "token_group":
            return f"token_group{self.group_size}"
        if self.kind == "per_channel":
            return f"per_channel(axis={self.axis})"
        return self.kind


PER_TENSOR = Granularity("per_tensor")
PER_CHANNEL = Granularity("per_channel", axis=0)
PER_TOKEN = Granularity("per_token")


def _token_axis(x: torch.Tensor) -> int:
    # (B, C, H, W) conv activations carry channels on axis 1; (B, T, C) and (B, C) on the last axis
    return 1 if x.ndim == 4 else x.ndim - 1


def group_view(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """A (G, n) view (or copy) of `x`: row g holds the elements sharing scale g."""
    kind = granularity.kind
    if kind == "per_tensor":
        return x.reshape(1, -1)
    if kind == "per_channel":
        return x.movedim(granularity.axis, 0).reshape(x.shape[granularity.axis], -1)
    if kind == "per_token":
        return x.movedim(_token_axis(x), -1).reshape(-1, x.shape[_token_axis(x)])
    if kind == "token_group":
        channels = x.shape[_token_axis(x)]
        if channels % granularity.group_size:
            raise ConfigError(
                f"Activation group size {granularity.group_size} does not divide the {channels} channels of an "
                f"input of shape {tuple(x.shape)}; choose a divisor or per_token."
            )
        return x.movedim(_token_axis(x), -1).reshape(-1, granularity.group_size)
    flat = x.reshape(x.shape[0], -1)  # weights: (out, in * kernel)
    size = granularity.group_size
    if flat.shape[1] % size:
        raise ConfigError(
            f"Group size {size} does not divide the reduction dimension {flat.shape[1]} of a tensor of shape "
            f"{tuple(x.shape)}; choose a divisor or per_channel."
        )
    return flat.reshape(-1, size)


def ungroup(view: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    """Inverse of `group_view` for a tensor of the original `shape`."""
    kind = granularity.kind
    if kind == "per_tensor" or kind == "group":
        return view.reshape(shape)
    if kind == "per_channel":
        axis = granularity.axis % len(shape)  # -1 = the last (channel) axis of a linear layer's input
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
        return view.reshape(moved).movedim(0, axis)
    axis = 1 if len(shape) == 4 else len(shape) - 1
    moved = (*shape[:axis], *shape[axis + 1 :], shape[axis])
    return view.reshape(moved).movedim(-1, axis)


def num_groups(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> int | None:
    """Number of scales for a static tensor of `shape`; None for per-token (it depends on the batch)."""
    kind = granularity.kind
    if kind == "per_tensor":
        return 1
    if kind == "per_channel":
        return shape[granularity.axis]
    if kind in ("per_token", "token_group"):
        return None
    total = 1
    for dim in shape:
        total *= dim
    return total // granularity.group_size
