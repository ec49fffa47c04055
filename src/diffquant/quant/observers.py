"""Observers: turn observed values into a per-group clipping range [low, high].

Every observer consumes (G, n) grouped views through `update` and reports `range()`. The Lp
shrink-grid search follows Q-Diffusion/LAPQ: 80 candidates that shrink [min, max] by 1 % steps,
scored by the Lp error (p = 2.4) of the quantized values; `shrink_search` takes any per-group error
function, so the same loop serves output-error search in higher layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffquant.errors import ConfigError
from diffquant.quant.formats import NumberFormat
from diffquant.quant.functional import fake_quantize, params_from_range

OBSERVERS = ("minmax", "ema", "percentile", "lp")

ErrorFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Observer:
    """Running min/max per group (the `minmax` observer and the base of the others)."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self, view: torch.Tensor) -> None:
        view = view.detach().float()
        low, high = view.amin(1), view.amax(1)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)

    @property
    def observed(self) -> bool:
        return self.low is not None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low is None:
            raise RuntimeError("observer has seen no data")
        return self.low, self.high


class EMAMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (Q-Diffusion's `running_stat`, momentum 0.95)."""

    def __init__(self, momentum: float = 0.95) -> None:
        super().__init__()
        self.momentum = momentum

    def update(self, view: torch.Tensor) -> None:
        view = view.detach().float()
        low, high = view.amin(1), view.amax(1)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = self.momentum * self.low + (1 - self.momentum) * low
            self.high = self.momentum * self.high + (1 - self.momentum) * high


class _SampleReservoir:
    """Keeps at most `capacity` columns of the grouped view, drawn uniformly, for search observers."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.columns: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, view: torch.Tensor) -> None:
        view = view.detach().float()
        if view.shape[1] > self.capacity:
            view = view[:, torch.randperm(view.shape[1], generator=self.generator)[: self.capacity]]
        merged = view if self.columns is None else torch.cat([self.columns, view], 1)
        if merged.shape[1] > self.capacity:
            merged = merged[:, torch.randperm(merged.shape[1], generator=self.generator)[: self.capacity]]
        self.columns = merged


class PercentileObserver(Observer):
    """Mean over batches of the per-group `percentile` / (100 - `percentile`) quantiles."""

    def __init__(self, percentile: float = 99.99, capacity: int = 1 << 20) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}.")
        self.percentile = percentile
        self.reservoir = _SampleReservoir(capacity)

    def update(self, view: torch.Tensor) -> None:
        super().update(view)
        self.reservoir.add(view)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.reservoir.columns
        if values is None:
            raise RuntimeError("observer has seen no data")
        q = self.percentile / 100.0
        return torch.quantile(values, 1 - q, dim=1), torch.quantile(values, q, dim=1)


def lp_error(p: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-group mean |x - x_q|^p."""

    def error(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return (original - quantized).abs().pow(p).mean(1)

    return error


def shrink_search(
    low: torch.Tensor, high: torch.Tensor, error_fn: ErrorFunction, grid: int = 80, step: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the candidate [low, high] * (1 - i * step), i < grid, with the smallest error_fn."""
    best_error = torch.full_like(low, float("inf"))
    best_low, best_high = low.clone(), high.clone()
    for i in range(grid):
        factor = 1.0 - i * step
        if factor <= 0:
            break
        candidate_low, candidate_high = low * factor, high * factor
        error = error_fn(candidate_low, candidate_high)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_low = torch.where(better, candidate_low, best_low)
        best_high = torch.where(better, candidate_high, best_high)
    return best_low, best_high


class LpSearchObserver(Observer):
    """Q-Diffusion's MSE initialisation: shrink-grid search of the clipping range under an Lp error."""

    def __init__(
        self, fmt: NumberFormat, symmetric: bool, p: float = 2.4, grid: int = 80, capacity: int = 1 << 20
    ) -> None:
        super().__init__()
        self.fmt, self.symmetric, self.p, self.grid = fmt, symmetric, p, grid
        self.reservoir = _SampleReservoir(capacity)

    def update(self, view: torch.Tensor) -> None:
        super().update(view)
        self.reservoir.add(view)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = super().range()
        values = self.reservoir.columns
        error = lp_error(self.p)

        def candidate_error(candidate_low: torch.Tensor, candidate_high: torch.Tensor) -> torch.Tensor:
            scale, zero_point = params_from_range(candidate_low, candidate_high, self.fmt, self.symmetric)
            return error(values, fake_quantize(values, scale[:, None], zero_point[:, None], self.fmt))

        return shrink_search(low, high, candidate_error, self.grid)


def make_observer(name: str, fmt: NumberFormat, symmetric: bool, **options: float) -> Observer:
    """An observer by name: minmax, ema, percentile or lp (MSE shrink-grid)."""
    if name == "minmax":
        return Observer()
    if name == "ema":
        return EMAMinMaxObserver(**options)
    if name == "percentile":
        return PercentileObserver(**options)
    if name == "lp":
        return LpSearchObserver(fmt, symmetric, **options)
    raise ConfigError(f"Unknown observer '{name}'. Choose one of: {', '.join(OBSERVERS)}.")
