"""A token generator under the continuous models' evaluation protocol: same N, seed, batch size,
reference set and Scorer; the generator's own sampler replaces the protocol's diffusers scheduler."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffquant.cache import cache_dir, json_digest, model_digest, safe_name
from diffquant.data.images import to_uint8
from diffquant.evaluation.protocol import EvalProtocol, EvalReport, Scorer, agreement
from diffquant.fileio import atomic_file
from diffquant.tokens.generator import TokenGenerator
from diffquant.tokens.samplers import TokenSamplerConfig


def protocol_token_samples(
    generator: TokenGenerator, protocol: EvalProtocol, sampler: TokenSamplerConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): the protocol's N class-balanced samples from its seed, in its batch size."""
    protocol.validate()
    return generator.generate(
        protocol.num_samples, sampler or generator.sampler, seed=protocol.seed, batch_size=protocol.batch_size
    )


def cached_token_samples(
    generator: TokenGenerator, protocol: EvalProtocol, sampler: TokenSamplerConfig | None = None
) -> torch.Tensor:
    """A generator's protocol samples, cached on disk by the digest of both networks (full-precision references)."""
    sampler = sampler or generator.sampler
    digest = model_digest(nn.ModuleList([generator.tokenizer, generator.denoiser]))
    key = json_digest({"protocol": protocol.to_json(), "sampler": asdict(sampler)})
    path = cache_dir() / "samples" / f"{safe_name(generator.name)}-tokens-{digest}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    images, _ = protocol_token_samples(generator, protocol, sampler)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), images.numpy())
    path.with_suffix(".tmp.npy").replace(path)
    return images


def evaluate_token_generator(
    generator: TokenGenerator,
    protocol: EvalProtocol,
    scorer: Scorer | None = None,
    reference_images: torch.Tensor | None = None,
    sampler: TokenSamplerConfig | None = None,
) -> EvalReport:
    """Sample and score like `evaluation.evaluate`; with `reference_images` (e.g. the full-precision
    generator's samples from the same seeds) also PSNR/SSIM agreement. Metrics add network calls per image."""
    sampler = sampler or generator.sampler
    scorer = scorer or Scorer.load(protocol.reference)
    started = time.perf_counter()
    images, labels = protocol_token_samples(generator, protocol, sampler)
    seconds = time.perf_counter() - started
    metrics = scorer.score(images, labels, protocol.precision_recall_k)
    metrics["sampling_s"] = seconds
    metrics["ms_per_image"] = 1000 * seconds / protocol.num_samples
    metrics["network_calls"] = sampler.network_calls(generator.denoiser.config.num_tokens)
    if reference_images is not None:
        metrics.update(agreement(images, reference_images))
    return EvalReport(generator.name, protocol, metrics, images, labels)


def save_token_samples(
    images: torch.Tensor, labels: torch.Tensor, sampler: TokenSamplerConfig, seed: int, npz_path: str | Path
) -> Path:
    """The continuous `save_samples` layout (uint8 images, labels, sampler name as `scheduler`, steps, seed)."""
    payload = {
        "images": to_uint8(images).numpy(),
        "labels": labels.numpy(),
        "scheduler": np.array(sampler.sampler),
        "steps": np.array(sampler.steps),
        "guidance_scale": np.array(sampler.guidance_scale),
        "seed": np.array(seed),
    }
    with atomic_file(npz_path) as scratch, open(scratch, "wb") as handle:
        np.savez_compressed(handle, **payload)
    return Path(npz_path)
