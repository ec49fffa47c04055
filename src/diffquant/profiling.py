"""Wall time and peak resident memory of a block of work (RSS sampled from /proc by a thread)."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


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
