"""Distribution-aware range groups (DGQ, Ryu et al. ICLR 2025): channels that share one quantization range.

Per-channel activation ranges are clustered by k-means on their (min, max) pairs into G groups; every
channel then uses its group's range, the smallest min and largest max of its members (DGQ's "minmax"
centre, better than the cluster mean in the paper's ablation). Outlier channels form their own small
groups, so they no longer stretch the grid of every other channel. G = 1 is the per-tensor range.
"""

from __future__ import annotations

import torch

from diffquant.errors import ConfigError

KMEANS_ITERATIONS = 50


def spread(low: torch.Tensor, high: torch.Tensor) -> float:
    """DGQ's D_d: how unevenly ranges spread along one dimension (range of the maxima + range of the minima)."""
    return float((high.max() - high.min()) + (low.max() - low.min()))


def kmeans_labels(points: torch.Tensor, groups: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster labels of (n, d) points: Lloyd's k-means from a deterministic farthest-point start."""
    if groups <= 0:
        raise ConfigError(f"The number of range groups must be positive, got {groups}.")
    points = points.double()
    groups = min(groups, len(points))
    # start from the point nearest the mean, then repeatedly the point farthest from every chosen centre
    chosen = [int((points - points.mean(0)).norm(dim=1).argmin())]
    for _ in range(1, groups):
        distance = torch.cdist(points, points[chosen]).amin(1)
        chosen.append(int(distance.argmax()))
    centres = points[chosen].clone()
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for group in range(groups):
            members = points[labels == group]
            if len(members):
                centres[group] = members.mean(0)
        updated = torch.cdist(points, centres).argmin(1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def grouped_ranges(low: torch.Tensor, high: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) replaced by the range of each channel's k-means group of (low, high) pairs."""
    labels = kmeans_labels(torch.stack([low.float(), high.float()], 1), groups)
    group_low = torch.full((int(labels.max()) + 1,), float("inf")).scatter_reduce(0, labels, low.float(), "amin")
    group_high = torch.full((int(labels.max()) + 1,), float("-inf")).scatter_reduce(0, labels, high.float(), "amax")
    return group_low[labels], group_high[labels]
