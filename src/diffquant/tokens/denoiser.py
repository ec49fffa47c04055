"""The token denoiser: a bidirectional transformer predicting p(x0 | x_t) over the codebook.

Mask token = index K (never predicted); the class label enters as a prepended token, and class index
`num_classes` is the learned null class used for classifier-free guidance (Improved VQ-Diffusion).
Built from plain nn.Linear layers so the quantization core can wrap every matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError


@dataclass(frozen=True)
class DenoiserConfig:
    """Transformer shape; defaults are the brief's ~1M-parameter CPU generator (d=128, 4 layers)."""

    codebook_size: int = 256  # K real codes; the mask token is K
    num_tokens: int = 49  # 7x7 grid
    num_classes: int = 10  # class `num_classes` is the learned null class
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    def validate(self) -> None:
        if self.depth < 1 or self.heads < 1:
            raise ConfigError(f"depth and heads must be >= 1, got depth {self.depth}, heads {self.heads}.")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} must be divisible by heads {self.heads}.")
        if self.codebook_size < 2 or self.num_tokens < 1:
            raise ConfigError("codebook_size must be >= 2 and num_tokens >= 1.")

    @property
    def mask_token(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_json(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenDenoiser(nn.Module):
    """tokens (B, N) in [0, K] (K = mask) and labels (B,) -> logits (B, N, K) of p(x0 | x_t)."""

    def __init__(self, config: DenoiserConfig = DenoiserConfig()):
        super().__init__()
        config.validate()
        self.config = config
        d = config.width
        self.token_embed = nn.Embedding(config.codebook_size + 1, d)
        self.class_embed = nn.Embedding(config.num_classes + 1, d)  # last row: the learned null class
        self.position = nn.Parameter(torch.randn(1, config.num_tokens + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.codebook_size)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.num_tokens:
            raise ConfigError(f"TokenDenoiser expects (B, {c.num_tokens}) tokens, got {tuple(tokens.shape)}.")
        if labels is None:
            labels = torch.full((tokens.shape[0],), c.null_class, dtype=torch.long, device=tokens.device)
        x = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens)], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))
