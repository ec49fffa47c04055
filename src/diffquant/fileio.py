"""Crash-safe writes: a directory or file appears complete or not at all.

A directory is written into a scratch folder `.NAME.partial-PID-XXXX` beside it and moved into place
with two renames (the old directory goes to `.NAME.old-PID` first and is removed last). A process
killed in between leaves those hidden folders behind; the next save (or load) of NAME restores the old
directory when NAME is missing and removes the leftovers, but only those of processes that are dead.
Output folders are never replaced when they hold something else than an output of the same kind,
unless the caller says `overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from diffquant.errors import DiffquantError


class WriteError(DiffquantError, OSError):
    """Writing an output failed (disk full, permissions); nothing was changed."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries: give them the user's usual modes."""
    mask = _umask()
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[Path, str, int]]:
    """(path, 'partial' or 'old', pid) of the scratch and backup entries of earlier saves of `target`."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(partial|old)-(\d+)(?:-.*)?$")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            yield entry, match.group(1), int(match.group(2))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted(target: str | Path) -> None:
    """Undo what a killed save of `target` left: restore its previous version when `target` is missing,
    and remove scratch/backup entries of dead processes (live writers are left alone)."""
    target = Path(target)
    for entry, kind, pid in sorted(_leftovers(target), key=lambda item: item[1] == "partial"):
        if pid_alive(pid):
            continue
        if kind == "old" and not os.path.lexists(target):
            os.replace(entry, target)  # the crash came between the two renames: the old version returns
        else:
            _remove(entry)


def check_output(target: str | Path, marker: str | None = None, overwrite: bool = False) -> Path:
    """Refuse an output path that would replace the working directory or a folder of something else.

    `marker` names the file every output of this kind holds (e.g. 'quantization.json'): an existing
    directory without it is only replaced when it is empty or `overwrite` is set.
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or target.name in ("", ".", ".."):
        raise DiffquantError(
            f"Output '{target}' is the current directory, one of its parents or a '..' path; diffquant replaces "
            "an output folder as a whole, so give a new sub-folder (e.g. --out ./result)."
        )
    if target.exists() and not target.is_dir():
        raise DiffquantError(f"Output '{target}' exists and is a file; choose a folder name that is free.")
    if marker is None or overwrite or not target.is_dir():
        return target
    entries = list(target.iterdir())
    if entries and not (target / marker).is_file():
        shown = ", ".join(sorted(e.name for e in entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise DiffquantError(
            f"Output '{target}' already exists and is not a diffquant output of this kind (it holds {shown}); "
            "choose another folder, or pass --overwrite (overwrite=True in Python) to replace it."
        )
    return target


def ensure_free_space(target: str | Path, needed_bytes: int, what: str = "the output") -> None:
    """Refuse before writing when the file system of `target` has less than `needed_bytes` free."""
    probe = Path(target).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise WriteError(
            f"Not enough disk space for {what} in {probe}: it needs about {needed_bytes / 1e6:.1f} MB and "
            f"{free / 1e6:.1f} MB are free. Free some space or choose another folder."
        )


@contextmanager
def atomic_directory(target: str | Path, marker: str | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `target` in one rename, on error it is removed.

    With `marker`, an existing `target` that is not empty and lacks that file is refused (see
    `check_output`) unless `overwrite`.
    """
    target = Path(target)
    check_output(target, marker, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    except OSError as error:
        raise WriteError(f"Cannot create {target}: {error}. Choose a folder you can write to.") from error
    try:
        yield scratch
        _follow_umask(scratch)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, DiffquantError):
            raise
        raise WriteError(
            f"Could not write {target}: {error}. Nothing was changed; free some space (or fix the "
            "permissions) and run again."
        ) from error
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backup = None
    if os.path.lexists(target):
        backup = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, backup)
    try:
        os.replace(scratch, target)
    except OSError as error:
        if backup is not None:
            os.replace(backup, target)
        shutil.rmtree(scratch, ignore_errors=True)
        raise WriteError(f"Could not move the new {target} into place: {error}. The old one is kept.") from error
    if backup is not None:
        _remove(backup)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside `target`; it is renamed onto `target` only when the block succeeds."""
    target = Path(target)
    if target.is_dir():
        raise DiffquantError(f"'{target}' is a directory; give a file name to write to.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(target)
        handle, scratch_name = tempfile.mkstemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent)
    except OSError as error:
        raise WriteError(f"Cannot create {target}: {error}. Choose a folder you can write to.") from error
    os.close(handle)
    scratch = Path(scratch_name)
    try:
        yield scratch
        _follow_umask(scratch)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    os.replace(scratch, target)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically: a kill leaves the previous file or the new one, never half of it."""
    with atomic_file(path) as scratch:
        scratch.write_text(text)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically, pretty-printed, with a trailing newline."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
