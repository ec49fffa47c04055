"""A small convolutional VQ autoencoder: 28x28 images -> a 7x7 grid of codebook indices -> images."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError
from diffquant.tokens.quantizers import QUANTIZER_KINDS, QuantizerOutput, build_quantizer


@dataclass(frozen=True)
class TokenizerConfig:
    """Shape of the VQ autoencoder; the defaults are the CPU demo preset of the research brief."""

    quantizer: str = "vq"  # vq (EMA + k-means init + dead-code restarts), simvq, fsq or rvq
    codebook_size: int = 256  # K; 7x7 tokens of 8 bits = 0.5 bits per pixel
    latent_dim: int = 32  # code vector width D (FSQ: the number of levels)
    width: int = 32  # channels at 14x14; 2x at 7x7
    image_channels: int = 1
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    rvq_depth: int = 2

    def validate(self) -> None:
        if self.quantizer not in QUANTIZER_KINDS:
            raise ConfigError(f"Unknown quantizer '{self.quantizer}'. Choose one of: {', '.join(QUANTIZER_KINDS)}.")
        if self.width < 4:
            raise ConfigError(f"width must be >= 4, got {self.width}.")

    def to_json(self) -> dict:
        out = asdict(self)
        out["fsq_levels"] = list(self.fsq_levels)
        return out

    @classmethod
    def from_json(cls, data: dict) -> TokenizerConfig:
        data = dict(data)
        data["fsq_levels"] = tuple(data.get("fsq_levels", (8, 5, 5, 5)))
        return cls(**data)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class VQAutoencoder(nn.Module):
    """Encoder (two stride-2 stages) -> quantizer on every 7x7 position -> mirrored decoder."""

    def __init__(self, config: TokenizerConfig = TokenizerConfig()):
        super().__init__()
        config.validate()
        self.config = config
        w, d = config.width, config.latent_dim
        if config.quantizer == "fsq":
            d = len(config.fsq_levels)
        self.encoder = nn.Sequential(
            nn.Conv2d(config.image_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1),  # 28 -> 14
            ResBlock(w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),  # 14 -> 7
            ResBlock(2 * w),
            ResBlock(2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, d, 1),
        )
        self.quantizer = build_quantizer(config.quantizer, config.codebook_size, d, config.fsq_levels, config.rvq_depth)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * w, 3, padding=1),
            ResBlock(2 * w),
            ResBlock(2 * w),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1),  # 7 -> 14
            ResBlock(w),
            nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1),  # 14 -> 28
            nn.SiLU(),
            nn.Conv2d(w, config.image_channels, 3, padding=1),
        )

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents (B, D, 7, 7)."""
        return self.encoder(images)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        b, d, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, d)
        out = self.quantizer(flat)
        quantized = out.quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction and the quantizer output (indices flattened over batch and positions)."""
        quantized, out = self.quantize(self.encode_latents(images))
        return self.decoder(quantized), out

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> token grids (B, h, w) int64 (residual VQ: (B, h, w, depth))."""
        latents = self.encode_latents(images)
        b, _, h, w = latents.shape
        _, out = self.quantize(latents)
        return out.indices.reshape(b, h, w, *out.indices.shape[1:])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids -> images in [-1, 1]."""
        vectors = self.quantizer.embed(tokens)  # (B, h, w, D)
        return self.decoder(vectors.permute(0, 3, 1, 2)).clamp(-1, 1)
