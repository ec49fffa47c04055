"""The benchmark: models x methods x settings (and peer libraries) under one evaluation protocol."""

from diffquant.bench.matrix import BENCH_PRESETS, BenchPreset, RowSpec
from diffquant.bench.runner import run_bench

__all__ = ["BENCH_PRESETS", "BenchPreset", "RowSpec", "run_bench"]
