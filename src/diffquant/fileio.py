"""Crash-safe writes: a directory or file appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `target` in one rename, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, backup)
    os.replace(scratch, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside `target`; it is renamed onto `target` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch_name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    scratch = Path(scratch_name)
    try:
        yield scratch
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    os.replace(scratch, target)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically, pretty-printed, with a trailing newline."""
    with atomic_file(path) as scratch:
        scratch.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
