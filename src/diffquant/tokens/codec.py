"""The tokenizer as an image codec: index maps -> lossless coder -> a file; k-means codebook ladders.

Rate is measured on the bytes actually written: bpp = 8 * len(payload) / pixels, so the reported rate
always equals the counted bits. Variable rate from one tokenizer follows Mao et al. 2023 (k-means
clustering of the codebook) and VQ-DDM's ReFiT rebuild (k-means on a pool of encoder latents).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

from diffquant.errors import DiffquantError
from diffquant.evaluation.agreement import psnr, ssim
from diffquant.evaluation.protocol import Scorer
from diffquant.tokens.entropy import CODERS, empirical_entropy_bits
from diffquant.tokens.quantizers import kmeans
from diffquant.tokens.tokenizer import VQAutoencoder

MAGIC = b"DQTK"
VERSION = 1
_HEADER = struct.Struct("<4sBBIHHII")  # magic, version, coder, K, h, w, count, payload bytes
_CODER_IDS = {"arithmetic": 0, "lzma": 1}


@dataclass(frozen=True)
class EncodedTokens:
    """A coded batch of token grids and its rate accounting."""

    data: bytes  # header + payload, exactly what `compress` writes
    count: int
    height: int
    width: int
    codebook_size: int
    coder: str

    @property
    def payload_bits(self) -> int:
        return 8 * (len(self.data) - _HEADER.size)

    @property
    def total_bits(self) -> int:
        return 8 * len(self.data)


def encode_tokens(tokens: torch.Tensor, codebook_size: int, coder: str = "arithmetic") -> EncodedTokens:
    """Token grids (B, h, w) -> bytes with a fixed header and the coded index stream."""
    if coder not in CODERS:
        raise DiffquantError(f"Unknown coder '{coder}'. Choose one of: {', '.join(CODERS)}.")
    if tokens.ndim != 3:
        raise DiffquantError(f"encode_tokens expects (B, h, w) token grids, got {tuple(tokens.shape)}.")
    count, h, w = tokens.shape
    payload = CODERS[coder][0](tokens.reshape(-1).numpy(), codebook_size)
    header = _HEADER.pack(MAGIC, VERSION, _CODER_IDS[coder], codebook_size, h, w, count, len(payload))
    return EncodedTokens(header + payload, count, h, w, codebook_size, coder)


def decode_tokens(data: bytes) -> torch.Tensor:
    """Inverse of `encode_tokens`: bytes -> token grids (B, h, w)."""
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise DiffquantError("not a diffquant token stream (bad magic); was it written by `diffquant compress`?")
    magic, version, coder_id, k, h, w, count, length = _HEADER.unpack(data[: _HEADER.size])
    if version != VERSION:
        raise DiffquantError(f"token stream version {version} is not supported (this build reads {VERSION}).")
    payload = data[_HEADER.size : _HEADER.size + length]
    if len(payload) != length:
        raise DiffquantError(f"token stream truncated: {len(payload)} of {length} payload bytes.")
    coder = {v: n for n, v in _CODER_IDS.items()}[coder_id]
    symbols = CODERS[coder][1](payload, count * h * w, k)
    return torch.from_numpy(symbols).reshape(count, h, w)


def raw_bpp(codebook_size: int, tokens_per_image: int, pixels: int) -> float:
    """Rate before entropy coding: N log2 K / pixels."""
    return tokens_per_image * math.log2(codebook_size) / pixels


@torch.no_grad()
def latent_pool(tokenizer: VQAutoencoder, images: torch.Tensor, size: int = 40000, seed: int = 0) -> torch.Tensor:
    """A random pool of pre-quantization latent vectors (ReFiT step 1)."""
    latents = torch.cat([tokenizer.encode_latents(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:size]
    return flat[pick]


def rebuild_codebook(
    tokenizer: VQAutoencoder, pool: torch.Tensor, codebook_size: int, iters: int = 10
) -> VQAutoencoder:
    """A copy of `tokenizer` whose codebook is k-means(pool, K) (ReFiT re-build; ladder rung K)."""
    config = replace(tokenizer.config, quantizer="vq", codebook_size=codebook_size)
    rebuilt = VQAutoencoder(config)
    rebuilt.encoder.load_state_dict(tokenizer.encoder.state_dict())
    rebuilt.decoder.load_state_dict(tokenizer.decoder.state_dict())
    rebuilt.quantizer.set_codebook(kmeans(pool, codebook_size, iters=iters))
    return rebuilt.eval()


@torch.no_grad()
def rate_distortion(
    tokenizer: VQAutoencoder,
    images: torch.Tensor,
    coder: str = "arithmetic",
    batch_size: int = 500,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Rate (bpp raw / entropy / coded) and distortion (PSNR, SSIM) of the codec on `images` in [-1, 1];
    with a `scorer`, also the FID of the decoded images against its reference set."""
    tokens = torch.cat([tokenizer.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    encoded = encode_tokens(tokens, tokenizer.codebook_size, coder)
    decoded = decode_tokens(encoded.data)
    if not torch.equal(decoded, tokens):
        raise DiffquantError("codec round trip is not bit-exact; this is a bug in the entropy coder.")
    recon = torch.cat([tokenizer.decode(decoded[i : i + batch_size]) for i in range(0, len(decoded), batch_size)])
    pixels = images[0].numel() * len(images)
    h, w = tokens.shape[1:3]
    fid = {} if scorer is None else {"fid": scorer.fid(recon)}
    return {
        "codebook_size": tokenizer.codebook_size,
        "bpp_raw": raw_bpp(tokenizer.codebook_size, h * w, images[0].numel()),
        "bpp_entropy": empirical_entropy_bits(tokens.numpy(), tokenizer.codebook_size) / pixels,
        "bpp_coded": encoded.payload_bits / pixels,
        "bpp_file": encoded.total_bits / pixels,
        "psnr": psnr(recon, images).mean().item(),
        "ssim": ssim(recon, images).mean().item(),
        "codes_used": float(np.unique(tokens.numpy()).size) / tokenizer.codebook_size,
        **fid,
    }


def refit_tokenizer(
    tokenizer: VQAutoencoder,
    images: torch.Tensor,
    codebook_size: int,
    steps: int = 200,
    batch_size: int = 64,
    learning_rate: float = 3e-4,
    pool_size: int = 40000,
    seed: int = 0,
) -> tuple[VQAutoencoder, list[float]]:
    """VQ-DDM's ReFiT: re-build the codebook by k-means on encoder latents, then fine-tune the decoder
    (encoder and codebook frozen) to the new codes. Returns the tokenizer and its loss per step."""
    rebuilt = rebuild_codebook(tokenizer, latent_pool(tokenizer, images, pool_size, seed), codebook_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(rebuilt.decoder.parameters(), lr=learning_rate, betas=(0.5, 0.9))
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        with torch.no_grad():
            codes = rebuilt.quantizer.embed(rebuilt.encode(batch)).permute(0, 3, 1, 2)
        loss = torch.nn.functional.mse_loss(rebuilt.decoder(codes), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return rebuilt.eval(), losses
