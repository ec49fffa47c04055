"""A token-space image generator: tokenizer + token denoiser, sampled, saved and scored as one object."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.evaluation.protocol import Scorer
from diffquant.fileio import write_json
from diffquant.tokens.denoiser import TokenDenoiser
from diffquant.tokens.samplers import TokenSamplerConfig, sample_tokens
from diffquant.tokens.storage import load_token_model, save_token_model
from diffquant.tokens.tokenizer import VQAutoencoder

MANIFEST = "diffquant.json"
DEFAULT_SAMPLER = TokenSamplerConfig("maskgit", 8, guidance_scale=2.0)
"""What a generator samples with unless told otherwise: the fmnist-vq model card's best FID per network call."""


def is_token_generator(directory: str | Path) -> bool:
    manifest = Path(directory) / MANIFEST
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("kind") == "token-generator"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


@dataclass
class TokenGenerator:
    """Images = tokenizer.decode(sampler(denoiser)); class-conditional with a learned null class."""

    tokenizer: VQAutoencoder
    denoiser: TokenDenoiser
    name: str = "token-generator"
    sampler: TokenSamplerConfig = field(default=DEFAULT_SAMPLER)
    """The generator's default sampler (sample, eval and the benchmark use it)."""

    def __post_init__(self) -> None:
        if self.tokenizer.codebook_size != self.denoiser.config.codebook_size:
            raise ConfigError(
                f"tokenizer has K={self.tokenizer.codebook_size} codes but the denoiser predicts "
                f"{self.denoiser.config.codebook_size}; train the denoiser on this tokenizer's tokens."
            )

    @property
    def num_classes(self) -> int:
        return self.denoiser.config.num_classes

    def grid_shape(self) -> tuple[int, int]:
        side = int(round(self.denoiser.config.num_tokens**0.5))
        return side, self.denoiser.config.num_tokens // side

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        config: TokenSamplerConfig = TokenSamplerConfig(),
        labels: torch.Tensor | None = None,
        seed: int = 0,
        batch_size: int = 250,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [-1, 1], labels); labels default to balanced classes 0..C-1, 0, ..."""
        if labels is None:
            labels = torch.arange(num_samples) % self.num_classes
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (num_samples,) or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ConfigError(f"labels must be {num_samples} class indices in [0, {self.num_classes}).")
        h, w = self.grid_shape()
        images = []
        for i, start in enumerate(range(0, num_samples, batch_size)):
            batch = labels[start : start + batch_size]
            tokens = sample_tokens(self.denoiser, len(batch), config, batch, seed=seed * 100003 + i)
            images.append(self.tokenizer.decode(tokens.reshape(-1, h, w)))
        return torch.cat(images), labels

    def save(self, directory: str | Path, card: dict | None = None) -> Path:
        directory = Path(directory)
        save_token_model(self.tokenizer, directory / "tokenizer")
        save_token_model(self.denoiser, directory / "denoiser")
        manifest = {"kind": "token-generator", "name": self.name, "sampler": asdict(self.sampler), **(card or {})}
        write_json(directory / MANIFEST, manifest)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TokenGenerator:
        directory = Path(directory)
        if not is_token_generator(directory):
            raise DiffquantError(f"{directory} is not a token generator (no {MANIFEST} of kind token-generator).")
        manifest = json.loads((directory / MANIFEST).read_text())
        sampler = TokenSamplerConfig(**manifest["sampler"]) if "sampler" in manifest else DEFAULT_SAMPLER
        sampler.validate()
        tokenizer, denoiser = load_token_model(directory / "tokenizer"), load_token_model(directory / "denoiser")
        return cls(tokenizer, denoiser, manifest.get("name", directory.name), sampler)


def score_generator(
    generator: TokenGenerator,
    config: TokenSamplerConfig,
    num_samples: int = 1000,
    seed: int = 0,
    scorer: Scorer | None = None,
    batch_size: int = 250,
) -> dict:
    """FID/sFID/IS/precision/recall/class accuracy on the shipped feature network (the continuous
    models' Scorer), plus network calls per image and sampling time."""
    scorer = scorer or Scorer.load()
    started = time.perf_counter()
    images, labels = generator.generate(num_samples, config, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - started
    metrics = scorer.score(images, labels)
    metrics.update(
        {
            "network_calls": config.network_calls(generator.denoiser.config.num_tokens),
            "sampling_s": seconds,
            "ms_per_image": 1000 * seconds / num_samples,
            "num_samples": num_samples,
        }
    )
    return {"sampler": asdict(config), "metrics": metrics}
