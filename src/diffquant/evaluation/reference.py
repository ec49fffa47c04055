"""Reference feature statistics of a real image set, cached on disk per feature-network version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffquant.cache import cache_dir
from diffquant.data import load_fashion_mnist
from diffquant.data.images import ImageSet
from diffquant.errors import DiffquantError
from diffquant.evaluation.feature_net import FeatureNetwork, extract_features, load_feature_network, weights_digest
from diffquant.evaluation.metrics import GaussianStats
from diffquant.fileio import atomic_file

REFERENCE_SETS = ("fashion-mnist-test", "fashion-mnist-train")


@dataclass
class ReferenceStats:
    """What the metrics need of the real set: spatial features (for precision/recall) and two Gaussians."""

    name: str
    spatial: torch.Tensor
    pooled_stats: GaussianStats
    spatial_stats: GaussianStats


def load_reference_images(name: str, data_dir: str | Path | None = None) -> ImageSet:
    if name not in REFERENCE_SETS:
        raise DiffquantError(f"Unknown reference set '{name}'. Choose one of: {', '.join(REFERENCE_SETS)}.")
    return load_fashion_mnist(name.rsplit("-", 1)[1], data_dir)


def _stats_tensors(prefix: str, stats: GaussianStats) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.mean": torch.from_numpy(stats.mean),
        f"{prefix}.covariance": torch.from_numpy(stats.covariance),
        f"{prefix}.count": torch.tensor(stats.count),
    }


def _stats_from(prefix: str, tensors: dict[str, torch.Tensor]) -> GaussianStats:
    return GaussianStats(
        tensors[f"{prefix}.mean"].numpy(), tensors[f"{prefix}.covariance"].numpy(), int(tensors[f"{prefix}.count"])
    )


def reference_stats(
    name: str = "fashion-mnist-test",
    network: FeatureNetwork | None = None,
    data_dir: str | Path | None = None,
) -> ReferenceStats:
    """Statistics of a whole reference set; computed once, then read from the cache."""
    path = cache_dir() / "reference" / f"{name}-{weights_digest()}-v2.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            return ReferenceStats(
                name, tensors["spatial"], _stats_from("pooled", tensors), _stats_from("spatial", tensors)
            )
        except Exception:  # a damaged cache entry is recomputed, not trusted
            path.unlink(missing_ok=True)
    network = network or load_feature_network()
    features = extract_features(network, load_reference_images(name, data_dir).images)
    pooled_stats, spatial_stats = GaussianStats.of(features.pooled), GaussianStats.of(features.spatial)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as scratch:
        tensors = {"spatial": features.spatial.contiguous()}
        tensors.update(_stats_tensors("pooled", pooled_stats))
        tensors.update(_stats_tensors("spatial", spatial_stats))
        save_file(tensors, str(scratch))
    return ReferenceStats(name, features.spatial, pooled_stats, spatial_stats)


def subsample(features: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    if count >= len(features):
        return features
    generator = np.random.default_rng(seed)
    return features[torch.from_numpy(generator.choice(len(features), count, replace=False))]
