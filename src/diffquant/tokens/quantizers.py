"""Vector quantizers for tokenizers: EMA VQ (k-means init, dead-code restarts), SimVQ, FSQ, residual VQ.

Every quantizer maps a (N, D) batch of vectors to `QuantizerOutput(quantized, indices, loss, stats)`
with straight-through gradients, and `embed(indices)` maps indices back to vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError


@dataclass
class QuantizerOutput:
    """The result of quantizing a (N, D) batch."""

    quantized: torch.Tensor  # (N, D), straight-through: forward = code vectors, backward = identity
    indices: torch.Tensor  # (N,) int64, or (N, depth) for residual VQ
    loss: torch.Tensor  # scalar auxiliary loss (commitment / codebook)
    stats: dict[str, float] = field(default_factory=dict)


def usage_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used, used at least 10 times (VQ-DDM), and perplexity 2^H of the histogram."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log2()).sum().item()
    return {
        "usage": (counts > 0).double().mean().item(),
        "usage_10": (counts >= 10).double().mean().item(),
        "perplexity": 2.0**entropy,
        "entropy_bits": entropy,
    }


def _nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean) for every row of `vectors`."""
    distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return distances.argmin(1)


def kmeans(vectors: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++-lite seeding (random distinct rows); empty clusters re-seeded."""
    if vectors.shape[0] < k:
        raise ConfigError(f"k-means needs at least k={k} vectors, got {vectors.shape[0]}; pass a larger batch.")
    generator = torch.Generator().manual_seed(seed)
    data = vectors.detach().float()
    centroids = data[torch.randperm(data.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = _nearest(data, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # an empty cluster takes a random data point, so all k codes stay alive
            refill = torch.randint(0, data.shape[0], (int(empty.sum()),), generator=generator)
            centroids[empty] = data[refill]
    return centroids


@dataclass(frozen=True)
class VQConfig:
    """Nearest-neighbour VQ (van den Oord et al. 2017) with the codebook-health fixes."""

    codebook_size: int = 256
    dim: int = 32
    commitment: float = 0.25  # beta of the commitment loss (VQ-VAE paper)
    ema: bool = True  # EMA codebook updates instead of a codebook loss
    decay: float = 0.99  # EMA decay (papers use 0.99; vector-quantize-pytorch defaults to 0.8)
    kmeans_init: bool = True  # initialise the codebook by k-means on the first training batch
    restart_threshold: float = 1.0  # EMA count below which a code is dead and restarted
    restart_every: int = 20  # steps between dead-code restarts (0 = never)

    def validate(self) -> None:
        if self.codebook_size < 2 or self.dim < 1:
            raise ConfigError(f"codebook_size must be >= 2 and dim >= 1, got {self.codebook_size}, {self.dim}.")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay must be in (0, 1), got {self.decay}.")


class VectorQuantizer(nn.Module):
    """EMA (or loss-trained) VQ with k-means initialisation and dead-code restarts."""

    def __init__(self, config: VQConfig = VQConfig(), seed: int = 0):
        super().__init__()
        config.validate()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        init = (torch.rand(config.codebook_size, config.dim, generator=generator) * 2 - 1) / config.codebook_size
        if config.ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("ema_count", torch.ones(config.codebook_size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialised", torch.tensor(not config.kmeans_init))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self._restart_generator = torch.Generator().manual_seed(seed + 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def codes(self) -> torch.Tensor:
        return self.codebook

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codes())

    def set_codebook(self, centroids: torch.Tensor) -> None:
        """Overwrite the codebook (k-means init, ReFiT rebuilding); EMA statistics restart from it."""
        with torch.no_grad():
            self.codebook.data.copy_(centroids)
            self.ema_sum.copy_(centroids)
            self.ema_count.fill_(1.0)
            self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, indices: torch.Tensor) -> None:
        c = self.config
        onehot_counts = torch.bincount(indices, minlength=c.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, vectors)
        self.ema_count.mul_(c.decay).add_(onehot_counts, alpha=1 - c.decay)
        self.ema_sum.mul_(c.decay).add_(sums, alpha=1 - c.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + c.codebook_size * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, vectors: torch.Tensor) -> int:
        """Move codes whose EMA count fell below the threshold onto random current encoder outputs."""
        dead = self.ema_count < self.config.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(0, vectors.shape[0], (n_dead,), generator=self._restart_generator)
        self.codebook.data[dead] = vectors[pick].to(self.codebook.dtype)
        self.ema_sum[dead] = vectors[pick].to(self.ema_sum.dtype)
        self.ema_count[dead] = 1.0
        return n_dead

    def forward(self, vectors: torch.Tensor) -> QuantizerOutput:
        c = self.config
        if vectors.ndim != 2 or vectors.shape[1] != c.dim:
            raise ConfigError(f"VectorQuantizer expects (N, {c.dim}) vectors, got {tuple(vectors.shape)}.")
        if self.training and not bool(self.initialised):
            self.set_codebook(kmeans(vectors, c.codebook_size))
        indices = _nearest(vectors.detach(), self.codes().detach())
        quantized = self.embed(indices)
        loss = c.commitment * F.mse_loss(vectors, quantized.detach())
        if not c.ema:
            loss = loss + F.mse_loss(quantized, vectors.detach())
        restarted = 0
        if self.training:
            if c.ema:
                self._ema_update(vectors.detach().float(), indices)
            self.step += 1
            if c.restart_every and int(self.step) % c.restart_every == 0:
                restarted = self.restart_dead_codes(vectors.detach())
        straight = vectors + (quantized - vectors).detach()
        stats = usage_stats(indices, c.codebook_size)
        stats["restarted"] = float(restarted)
        return QuantizerOutput(straight, indices, loss, stats)


@dataclass(frozen=True)
class SimVQConfig:
    """SimVQ (Zhu et al. 2024): a frozen Gaussian codebook C and a learned linear map W; codes are C W."""

    codebook_size: int = 256
    dim: int = 32
    commitment: float = 0.25  # beta of the official config


class SimVQ(nn.Module):
    """Every step on W moves all codes, so none is left behind (no collapse)."""

    def __init__(self, config: SimVQConfig = SimVQConfig(), seed: int = 0):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        # std d^-1/2, as the SimVQ author stresses (lucidrains #170)
        self.register_buffer(
            "frozen", torch.randn(config.codebook_size, config.dim, generator=generator) / math.sqrt(config.dim)
        )
        self.transform = nn.Linear(config.dim, config.dim, bias=False)
        nn.init.eye_(self.transform.weight)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def codes(self) -> torch.Tensor:
        return self.transform(self.frozen)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codes())

    def forward(self, vectors: torch.Tensor) -> QuantizerOutput:
        codes = self.codes()
        indices = _nearest(vectors.detach(), codes.detach())
        quantized = F.embedding(indices, codes)
        loss = F.mse_loss(quantized, vectors.detach()) + self.config.commitment * F.mse_loss(
            vectors, quantized.detach()
        )
        straight = vectors + (quantized - vectors).detach()
        return QuantizerOutput(straight, indices, loss, usage_stats(indices, self.codebook_size))


@dataclass(frozen=True)
class FSQConfig:
    """Finite scalar quantization (Mentzer et al. 2023): each dimension rounded to a few fixed levels."""

    levels: tuple[int, ...] = (8, 5, 5, 5)  # 1000 implicit codes, the paper's default

    def validate(self) -> None:
        if not self.levels or any(level < 2 for level in self.levels):
            raise ConfigError(f"FSQ levels must all be >= 2, got {self.levels}.")


class FSQ(nn.Module):
    """Bound each dimension with tanh, round to its grid with straight-through gradients; no codebook."""

    def __init__(self, config: FSQConfig = FSQConfig()):
        super().__init__()
        config.validate()
        self.config = config
        levels = torch.tensor(config.levels, dtype=torch.int64)
        self.register_buffer("levels", levels)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels[:-1]]), 0)
        self.register_buffer("basis", basis)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(self.levels))

    @property
    def dim(self) -> int:
        return len(self.config.levels)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # even level counts need a half-step offset so the grid is symmetric (FSQ paper, appendix)
        half = (self.levels - 1).float() / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def grid_values(self, indices: torch.Tensor) -> torch.Tensor:
        """Integer grid coordinates in [0, L_i) per dimension for flat indices."""
        return (indices[..., None] // self.basis) % self.levels

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        half = (self.levels // 2).float()
        return (self.grid_values(indices).float() - half) / half

    def codes(self) -> torch.Tensor:
        return self.embed(torch.arange(self.codebook_size))

    def forward(self, vectors: torch.Tensor) -> QuantizerOutput:
        bounded = self._bound(vectors)
        rounded = bounded + (bounded.round() - bounded).detach()
        half = (self.levels // 2).float()
        quantized = rounded / half
        grid = (rounded.detach().round() + half).long()
        indices = (grid * self.basis).sum(-1)
        zero = vectors.new_zeros(())
        return QuantizerOutput(quantized, indices, zero, usage_stats(indices, self.codebook_size))


@dataclass(frozen=True)
class ResidualVQConfig:
    """Residual VQ: `depth` EMA quantizers, each quantizing what the previous ones left."""

    depth: int = 2
    stage: VQConfig = VQConfig()


class ResidualVQ(nn.Module):
    """Code vectors of all depths sum to the latent; indices are (N, depth)."""

    def __init__(self, config: ResidualVQConfig = ResidualVQConfig(), seed: int = 0):
        super().__init__()
        if config.depth < 1:
            raise ConfigError(f"ResidualVQ depth must be >= 1, got {config.depth}.")
        self.config = config
        self.stages = nn.ModuleList(VectorQuantizer(config.stage, seed=seed + 7 * i) for i in range(config.depth))

    @property
    def codebook_size(self) -> int:
        return self.config.stage.codebook_size

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return sum(stage.embed(indices[..., i]) for i, stage in enumerate(self.stages))

    def quantize_vector(self, vectors: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Greedy residual indices (N, depth) of `vectors` (ResGen: quantize a predicted embedding)."""
        residual = vectors
        out = []
        for stage in self.stages[: depth or len(self.stages)]:
            idx = _nearest(residual, stage.codes())
            out.append(idx)
            residual = residual - stage.embed(idx)
        return torch.stack(out, -1)

    def forward(self, vectors: torch.Tensor) -> QuantizerOutput:
        residual = vectors
        total = torch.zeros_like(vectors)
        indices, loss = [], vectors.new_zeros(())
        stats: dict[str, float] = {}
        for i, stage in enumerate(self.stages):
            out = stage(residual)
            code = stage.embed(out.indices)
            total = total + code
            residual = residual - code.detach()
            indices.append(out.indices)
            loss = loss + out.loss
            for key, value in out.stats.items():
                stats[f"{key}_{i}"] = value
        stats["usage"] = min(stats[f"usage_{i}"] for i in range(len(self.stages)))
        stats["perplexity"] = stats["perplexity_0"]
        straight = vectors + (total - vectors).detach()
        return QuantizerOutput(straight, torch.stack(indices, -1), loss, stats)


QUANTIZER_KINDS = ("vq", "simvq", "fsq", "rvq")


def build_quantizer(kind: str, codebook_size: int, dim: int, levels: tuple[int, ...] = (8, 5, 5, 5), depth: int = 2):
    """A quantizer by name: vq (EMA + k-means init + restarts), simvq, fsq or rvq."""
    if kind == "vq":
        return VectorQuantizer(VQConfig(codebook_size=codebook_size, dim=dim))
    if kind == "simvq":
        return SimVQ(SimVQConfig(codebook_size=codebook_size, dim=dim))
    if kind == "fsq":
        if len(levels) != dim:
            raise ConfigError(f"FSQ with levels {levels} needs latent dim {len(levels)}, got {dim}.")
        return FSQ(FSQConfig(levels=tuple(levels)))
    if kind == "rvq":
        return ResidualVQ(ResidualVQConfig(depth=depth, stage=VQConfig(codebook_size=codebook_size, dim=dim)))
    raise ConfigError(f"Unknown quantizer '{kind}'. Choose one of: {', '.join(QUANTIZER_KINDS)}.")
