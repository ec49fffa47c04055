"""What a benchmark row quantized: counts of quantized layers against the float model's."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from diffquant.modules import attention_processors, quantized_modules


def layer_coverage(denoiser: torch.nn.Module, original: torch.nn.Module) -> dict[str, Any]:
    """Quantized conv/linear layers out of the original's, plus quantized attention matmul pairs."""
    # one count per quantized float layer (a split-shortcut conv's two halves are one layer of the original)
    kinds = Counter(
        "conv2d" if issubclass(module.float_type, torch.nn.Conv2d) else "linear"
        for _, module in quantized_modules(denoiser)
    )
    total = Counter(
        "conv2d" if isinstance(m, torch.nn.Conv2d) else "linear"
        for m in original.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )
    matmuls = sum(1 for _, p in attention_processors(denoiser) if p.query_quantizer or p.probs_quantizer)
    text = f"{kinds['conv2d']}/{total['conv2d']} conv, {kinds['linear']}/{total['linear']} linear"
    return {"text": text + (f", {matmuls} attention matmul pairs" if matmuls else ""), "counts": dict(kinds)}
