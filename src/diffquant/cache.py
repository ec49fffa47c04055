"""The on-disk cache (reference statistics, full-precision samples, calibration sets) and model digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    """$DIFFQUANT_CACHE, else ~/.cache/diffquant."""
    return Path(os.environ.get("DIFFQUANT_CACHE", Path.home() / ".cache" / "diffquant"))


def model_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's state (names and values)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def json_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
