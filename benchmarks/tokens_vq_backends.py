"""Our EMA VQ / SimVQ vs vector-quantize-pytorch on one data stream: time per step, usage, perplexity.

The library is not a dependency; install it somewhere and point VQP_SITE at it, e.g.
    pip install --target /tmp/vqp_site vector-quantize-pytorch einops einx loguru torch-einops-utils --no-deps
    VQP_SITE=/tmp/vqp_site PYTHONPATH=src python benchmarks/tokens_vq_backends.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

from diffquant.tokens.quantizers import SimVQ, VectorQuantizer, VQConfig, usage_stats

sys.path.append(os.environ.get("VQP_SITE", "/tmp/vqp_site"))
from vector_quantize_pytorch import SimVQ as LucidrainsSimVQ  # noqa: E402
from vector_quantize_pytorch import VectorQuantize  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
CENTERS = torch.randn(400, 32)


def stream(generator: torch.Generator) -> torch.Tensor:
    """6,272 vectors (a 128-image batch of 7x7 latents) around 400 cluster centres."""
    index = torch.randint(0, 400, (6272,), generator=generator)
    return CENTERS[index] + 0.3 * torch.randn(6272, 32, generator=generator)


def ours(quantizer, x):
    out = quantizer(x)
    return out.quantized, out.indices, out.loss


def theirs(quantizer, x):
    quantized, indices, loss = quantizer(x[None])
    return quantized[0], indices[0], loss


def run(name: str, make, call, steps: int = 150) -> None:
    generator, quantizer = torch.Generator().manual_seed(0), make().train()
    started = time.perf_counter()
    for _ in range(steps):
        x = stream(generator).requires_grad_(True)
        quantized, _, loss = call(quantizer, x)
        (quantized.sum() + loss.sum()).backward()
    ms = 1000 * (time.perf_counter() - started) / steps
    with torch.no_grad():
        _, indices, _ = call(quantizer.eval(), stream(torch.Generator().manual_seed(99)))
    stats = usage_stats(indices.reshape(-1), 256)
    print(f"{name:55s} {ms:7.1f} ms/step  usage {stats['usage']:.3f}  perplexity {stats['perplexity']:.1f}")


if __name__ == "__main__":
    run("diffquant VectorQuantizer (EMA .99, k-means, restarts)", lambda: VectorQuantizer(VQConfig(256, 32)), ours)
    run("diffquant SimVQ", lambda: SimVQ(), ours)
    run("vector-quantize-pytorch VectorQuantize defaults", lambda: VectorQuantize(dim=32, codebook_size=256), theirs)
    run(
        "vector-quantize-pytorch decay .99 + k-means + dead-code 1",
        lambda: VectorQuantize(
            dim=32, codebook_size=256, decay=0.99, kmeans_init=True, threshold_ema_dead_code=1, rotation_trick=False
        ),
        theirs,
    )
    run("vector-quantize-pytorch SimVQ defaults", lambda: LucidrainsSimVQ(dim=32, codebook_size=256), theirs)
