"""Wall time and peak resident memory of a block of work (RSS sampled from /proc by a thread)."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
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
