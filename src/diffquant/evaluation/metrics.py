"""Sample-quality metrics on feature vectors: FID/sFID, classifier IS, k-NN precision/recall, accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from diffquant.errors import DiffquantError


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (what FID compares)."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> GaussianStats:
        values = np.asarray(features, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] < 2:
            raise DiffquantError(f"Need at least 2 feature vectors of shape (N, D), got {values.shape}.")
        if not np.isfinite(values).all():
            raise DiffquantError("Features contain NaN or Inf: the images being scored are not finite.")
        return cls(values.mean(0), np.cov(values, rowvar=False), values.shape[0])


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017)."""
    difference = a.mean - b.mean
    root, _ = scipy.linalg.sqrtm(a.covariance @ b.covariance, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularise as the reference implementation does
        offset = np.eye(a.covariance.shape[0]) * 1e-6
        root = scipy.linalg.sqrtm((a.covariance + offset) @ (b.covariance + offset))
    root = root.real
    value = difference @ difference + np.trace(a.covariance) + np.trace(b.covariance) - 2.0 * np.trace(root)
    return float(max(value, 0.0))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from a classifier's logits, mean and std over `splits` chunks."""
    probabilities = torch.softmax(logits.double(), dim=1)
    scores = []
    for chunk in probabilities.chunk(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(marginal + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radius(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def _inside_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024):
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], support)
        inside.append((distances <= radii[None]).any(1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with k-NN manifolds of the features."""
    real, fake = real.double(), fake.double()
    precision = _inside_manifold(fake, real, _kth_neighbour_radius(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, _kth_neighbour_radius(fake, k)).double().mean().item()
    return precision, recall


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of class-conditional samples the classifier assigns to the requested class."""
    return (logits.argmax(1) == labels).double().mean().item()
