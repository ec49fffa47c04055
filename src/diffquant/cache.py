"""The on-disk cache (reference statistics, full-precision samples, calibration sets) and model digests."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    """$DIFFQUANT_CACHE, else ~/.cache/diffquant (an empty value means unset, not the working directory)."""
    return Path(os.environ.get("DIFFQUANT_CACHE") or Path.home() / ".cache" / "diffquant")


def safe_name(name: str, limit: int = 64) -> str:
    """`name` reduced to one harmless path component (letters, digits, '.', '_', '-'; no leading dot).

    Model names come from files inside model directories; '../..' or '/abs' must not move a cache entry
    out of the cache. A name that had to change gets a short digest of the original, so different
    names never share an entry.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".")[:limit] or "model"
    if cleaned != name:
        cleaned += "_" + hashlib.sha256(str(name).encode()).hexdigest()[:8]
    return cleaned


def model_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's state (names and values)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def json_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
