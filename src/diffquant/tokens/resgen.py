"""ResGen-style generation of residual-VQ tokens (Kim et al. 2025): predict the collective embedding.

Each position carries `depth` RVQ tokens whose code vectors sum to the latent. Masking goes from the
finest depth to the coarsest: a position with m masked depths knows the sum of its first depth - m
codes. The network predicts, per position, the sum of the embeddings of its still-masked tokens (a
vector; a Gaussian/MSE head here instead of the paper's mixture of Gaussians), and the prediction is
quantized with the RVQ codebooks of the missing depths, so one network call yields every depth.
Sampling reveals tokens coarse-first on a cosine schedule, the most confident positions first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError
from diffquant.tokens.denoiser import Block
from diffquant.tokens.quantizers import ResidualVQ
from diffquant.tokens.schedule import cosine_mask_ratio


@dataclass(frozen=True)
class ResGenConfig:
    """Shape of the collective-embedding predictor."""

    latent_dim: int = 32
    depth: int = 2
    num_tokens: int = 49
    num_classes: int = 10  # class `num_classes` is the learned null class
    width: int = 128
    layers: int = 4
    heads: int = 4

    def to_json(self) -> dict:
        return asdict(self)


class ResGenDenoiser(nn.Module):
    """(known code sums (B, N, D), masked depth counts (B, N), labels) -> predicted masked sums (B, N, D)."""

    def __init__(self, config: ResGenConfig = ResGenConfig()):
        super().__init__()
        self.config = config
        d = config.width
        self.inp = nn.Linear(config.latent_dim, d)
        self.masked_depths = nn.Embedding(config.depth + 1, d)  # how many depths are still hidden
        self.class_embed = nn.Embedding(config.num_classes + 1, d)
        self.position = nn.Parameter(torch.randn(1, config.num_tokens + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.heads, 4) for _ in range(config.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, config.latent_dim)

    def forward(self, known: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.inp(known) + self.masked_depths(masked)
        x = torch.cat([self.class_embed(labels)[:, None], x], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, 1:]))


def split_sums(rvq: ResidualVQ, tokens: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of visible codes, sum of masked codes) for tokens (B, N, depth) with `masked` finest depths hidden."""
    depth = tokens.shape[-1]
    codes = torch.stack([stage.embed(tokens[..., i]) for i, stage in enumerate(rvq.stages)], -2)  # (B, N, depth, D)
    hidden = torch.arange(depth) >= (depth - masked)[..., None]  # finest `masked` depths are hidden
    return (codes * ~hidden[..., None]).sum(-2), (codes * hidden[..., None]).sum(-2)


def resgen_loss(
    model: ResGenDenoiser, rvq: ResidualVQ, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """MSE of the predicted collective embedding on positions with at least one masked depth."""
    b, n, depth = tokens.shape
    ratio = cosine_mask_ratio(torch.rand(b, generator=generator, dtype=torch.float64))
    hidden_tokens = (ratio * n * depth).ceil().long().clamp(1, n * depth)
    # spread the hidden count over positions in random order, finest depths first at each position
    ranks = torch.rand(b, n, generator=generator).argsort(1).argsort(1)
    full = hidden_tokens[:, None] // depth
    extra = hidden_tokens[:, None] % depth
    masked = torch.where(ranks < full, depth, torch.where(ranks == full, extra, 0))
    known, target = split_sums(rvq, tokens, masked)
    prediction = model(known, masked, labels)
    covered = masked > 0
    return F.mse_loss(prediction[covered], target[covered])


@torch.no_grad()
def sample_resgen(
    model: ResGenDenoiser,
    rvq: ResidualVQ,
    labels: torch.Tensor,
    steps: int = 8,
    generator: torch.Generator | None = None,
    noise: float = 0.0,
) -> torch.Tensor:
    """RVQ tokens (B, N, depth): each step predicts every masked sum, quantizes it over the missing depths,
    and keeps the coarsest new tokens at the most confident positions (cosine schedule)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    c = model.config
    b, n, depth = len(labels), c.num_tokens, c.depth
    tokens = torch.zeros(b, n, depth, dtype=torch.long)
    masked = torch.full((b, n), depth)
    for step in range(steps):
        known, _ = split_sums(rvq, tokens, masked)
        prediction = model(known, masked, labels)
        if noise > 0:  # the Gaussian head's sampling noise
            prediction = prediction + noise * torch.randn(prediction.shape, generator=generator)
        # quantize the prediction greedily over each position's missing depths
        residual, proposal, error = prediction, tokens.clone(), torch.zeros(b, n)
        for d, stage in enumerate(rvq.stages):
            codes = stage.codes()
            distances = torch.cdist(residual.reshape(-1, residual.shape[-1]), codes).reshape(b, n, -1)
            index = distances.argmin(-1)
            missing = d >= depth - masked
            proposal[..., d] = torch.where(missing, index, tokens[..., d])
            residual = residual - torch.where(missing[..., None], stage.embed(index), 0.0)
        error = residual.pow(2).sum(-1)
        target = int(math.floor(cosine_mask_ratio((step + 1) / steps).item() * n * depth))
        still = int(masked.sum(1).max())
        reveal_count = masked.sum(1) - min(target, max(still - 1, 0))  # tokens to reveal in each row
        confidence = torch.where(masked > 0, -error, -math.inf)
        order = confidence.argsort(1, descending=True)
        for row in range(b):
            left = int(reveal_count[row])
            for position in order[row].tolist():
                if left <= 0 or masked[row, position] == 0:
                    break
                take = min(left, int(masked[row, position]))
                first = depth - int(masked[row, position])
                tokens[row, position, first : first + take] = proposal[row, position, first : first + take]
                masked[row, position] -= take
                left -= take
    return tokens
