"""Wall time and peak resident memory of a block of work (RSS sampled from /proc by a thread)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


def host_label() -> str | None:
    """The CPU's model name and whether it has AMX (/proc/cpuinfo), e.g. "AMD EPYC (no AMX)": hosts vary,
    and AMX moves every int8 and bf16 speed ratio. None where /proc/cpuinfo does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return None if model is None else f"{model} ({'AMX' if 'amx_tile' in flags else 'no AMX'})"


# glibc's mallopt parameters; the mmap threshold under which a timed call's tensors come from reused heap
# pages (glibc's own adaptive threshold stops at 32 MiB, under the 84 MB feed-forward of an SD UNet at batch 2)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TIMING_MMAP_THRESHOLD = 2**30
GLIBC_SETTLED_THRESHOLDS = (32 * 2**20, 64 * 2**20)
"""Where glibc's adaptive mmap and trim thresholds end up in a long-running process: what is restored."""


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Set glibc's malloc thresholds; False where the C library is not glibc or refuses either value.

    Blocks above `mmap_bytes` are mapped fresh from the OS and unmapped on free: memory goes back at once,
    but each new tensor of that size page-faults on first touch. A low threshold (the real-size suite's
    while it builds copies of a model) keeps RSS down; timing wants a high one (`TIMING_MMAP_THRESHOLD`)
    and a high trim threshold, so that a denoiser call reuses freed heap pages: at 128 KiB a 4-block
    PixArt W8A8 call measured 18 % slower (422 ms against 358), and a fresh 100 MB tensor took 32 ms to
    fill against 4 ms from reused pages."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes)))
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, int(trim_bytes)))
    return mmap_set and trim_set


@contextlib.contextmanager
def malloc_thresholds(
    mmap_bytes: int, trim_bytes: int, restore: tuple[int, int] = GLIBC_SETTLED_THRESHOLDS
) -> Iterator[bool]:
    """glibc's malloc thresholds inside the block (yields whether they took), `restore` after it."""
    try:
        yield set_malloc_thresholds(mmap_bytes, trim_bytes)
    finally:
        set_malloc_thresholds(*restore)


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ResourceUsage:
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_increase_mb: float = 0.0


class measure_resources:  # noqa: N801 - used as a context manager
    """`with measure_resources() as usage: ...` fills wall time, peak RSS and its increase."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.usage = ResourceUsage()
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceUsage:
        self._baseline = self._peak = current_rss_bytes()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self.usage

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_bytes())
        self.usage.wall_time_s = time.perf_counter() - self._started
        self.usage.peak_rss_mb = self._peak / 2**20
        self.usage.peak_increase_mb = (self._peak - self._baseline) / 2**20


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 0) -> dict[str, float]:
    """Median milliseconds per call; the variants take turns, so a load change on a shared machine hits
    them all alike (ratios from one such run are what speed claims rest on). `warmup` untimed calls each
    first (compilation happens there)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}
