"""The evaluation protocol every diffquant model and method is scored with.

One `EvalProtocol` fixes the sampler, step count, seeds, number of samples, batch size and the
reference set, so numbers from different methods are comparable. Scores: FID and sFID on the shipped
feature network, classifier IS, k-NN precision/recall, class accuracy of conditional samples and,
against a reference model's samples from the same seeds, PSNR and SSIM.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffquant.cache import cache_dir, json_digest, model_digest, safe_name
from diffquant.errors import ConfigError
from diffquant.evaluation.agreement import psnr, ssim
from diffquant.evaluation.feature_net import FeatureNetwork, extract_features, load_feature_network
from diffquant.evaluation.metrics import (
    GaussianStats,
    class_accuracy,
    frechet_distance,
    inception_score,
    precision_recall,
)
from diffquant.evaluation.reference import (
    ReferenceStats,
    load_reference_images,
    reference_stats,
    subsample,
)
from diffquant.model import DiffusionModel
from diffquant.sampling import SamplerConfig, sample


@dataclass(frozen=True)
class EvalProtocol:
    """Everything that decides an evaluation's numbers. State it next to every number."""

    name: str = "standard"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig("ddim", 25))
    num_samples: int = 5000
    batch_size: int = 250
    seed: int = 0
    reference: str = "fashion-mnist-test"
    precision_recall_k: int = 3

    def validate(self) -> None:
        self.sampler.validate()
        if self.num_samples < 10:
            raise ConfigError(
                f"num_samples must be at least 10 for the statistics to mean anything, got {self.num_samples}."
            )
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")

    def describe(self) -> str:
        s = self.sampler
        guidance = "" if s.guidance_scale is None else f", CFG {s.guidance_scale}"
        return (
            f"{self.name}: {s.scheduler.upper()} {s.steps} steps{guidance}, N={self.num_samples} samples "
            f"(seed {self.seed}) vs {self.reference}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        return json_digest(self.to_json())


PROTOCOLS: dict[str, EvalProtocol] = {
    "smoke": EvalProtocol("smoke", SamplerConfig("ddim", 20), num_samples=200, batch_size=200),
    "quick": EvalProtocol("quick", SamplerConfig("ddim", 25), num_samples=1000, batch_size=250),
    "standard": EvalProtocol("standard", SamplerConfig("ddim", 25), num_samples=5000, batch_size=250),
}


def get_protocol(name: str, **overrides: Any) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol '{name}'. Choose one of: {', '.join(PROTOCOLS)}.")
    protocol = replace(PROTOCOLS[name], **{k: v for k, v in overrides.items() if v is not None})
    protocol.validate()
    return protocol


@dataclass
class Scorer:
    """The feature network and the reference statistics, loaded once and reused for many sets."""

    network: FeatureNetwork
    reference: ReferenceStats

    @classmethod
    def load(cls, reference: str = "fashion-mnist-test") -> Scorer:
        network = load_feature_network()
        return cls(network, reference_stats(reference, network))

    def fid(self, images: torch.Tensor) -> float:
        """FID alone (pooled features vs the reference): for image sets that are not model samples."""
        features = extract_features(self.network, images)
        return frechet_distance(GaussianStats.of(features.pooled), self.reference.pooled_stats)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None, k: int = 3) -> dict[str, float]:
        """FID, sFID, IS, precision/recall (and class accuracy when labels are given) of an image set."""
        features = extract_features(self.network, images)
        fid = frechet_distance(GaussianStats.of(features.pooled), self.reference.pooled_stats)
        sfid = frechet_distance(GaussianStats.of(features.spatial), self.reference.spatial_stats)
        inception, inception_std = inception_score(features.logits)
        # k-NN manifolds on the spatial features: the pooled classifier embedding maps even uniform
        # noise inside the real manifold (precision 0.97), the spatial one does not (0.0)
        real = subsample(self.reference.spatial, len(images))
        precision, recall = precision_recall(real, features.spatial, k)
        scores = {
            "fid": fid,
            "sfid": sfid,
            "is": inception,
            "is_std": inception_std,
            "precision": precision,
            "recall": recall,
        }
        if labels is not None:
            scores["class_accuracy"] = class_accuracy(features.logits, labels)
        return scores


@dataclass
class EvalReport:
    """Scores of one model under one protocol, plus the samples they came from."""

    model: str
    protocol: EvalProtocol
    metrics: dict[str, float]
    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "protocol": self.protocol.to_json(), "metrics": self.metrics}


def agreement(images: torch.Tensor, reference_images: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of `images` against another model's samples from the same seeds."""
    return {
        "psnr_vs_ref": psnr(images, reference_images).mean().item(),
        "ssim_vs_ref": ssim(images, reference_images).mean().item(),
    }


def evaluate(
    model: DiffusionModel,
    protocol: EvalProtocol,
    scorer: Scorer | None = None,
    reference_images: torch.Tensor | None = None,
    progress: bool = True,
) -> EvalReport:
    """Sample `model` under `protocol` and score the samples; with `reference_images` (another model's
    samples from the same seeds, e.g. full precision) also report PSNR/SSIM agreement."""
    protocol.validate()
    scorer = scorer or Scorer.load(protocol.reference)
    started = time.perf_counter()
    result = protocol_samples(model, protocol, progress)
    sampling_time = time.perf_counter() - started
    metrics = scorer.score(result.images, result.labels, protocol.precision_recall_k)
    metrics["sampling_s"] = sampling_time
    metrics["ms_per_image"] = 1000 * sampling_time / protocol.num_samples
    if reference_images is not None:
        metrics.update(agreement(result.images, reference_images))
    return EvalReport(model.info.name, protocol, metrics, result.images, result.labels)


def protocol_samples(model: DiffusionModel, protocol: EvalProtocol, progress: bool = True):
    """The protocol's samples of `model`: its sampler, N, batch size and seed."""
    return sample(
        model,
        protocol.num_samples,
        protocol.sampler,
        seed=protocol.seed,
        batch_size=protocol.batch_size,
        progress=progress,
    )


def data_floors(protocol: EvalProtocol, scorer: Scorer | None = None) -> dict[str, float]:
    """Scores of N real training images against the reference set: the best a model can do at this N."""
    scorer = scorer or Scorer.load(protocol.reference)
    train = load_reference_images("fashion-mnist-train").subset(protocol.num_samples, seed=protocol.seed)
    return scorer.score(train.images, train.labels, protocol.precision_recall_k)


def cached_samples(model: DiffusionModel, protocol: EvalProtocol, progress: bool = True) -> torch.Tensor:
    """A model's samples under `protocol`, cached on disk by weights digest (full-precision references)."""
    digest = model_digest(model.denoiser)
    path = cache_dir() / "samples" / f"{safe_name(model.info.name)}-{digest}-{protocol.key()}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    images = protocol_samples(model, protocol, progress).images
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), images.numpy())
    path.with_suffix(".tmp.npy").replace(path)
    return images


def write_report(payload: dict[str, Any], path: str | Path) -> Path:
    from diffquant.fileio import write_json

    write_json(path, payload)
    return Path(path)
