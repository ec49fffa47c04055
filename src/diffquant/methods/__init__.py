"""Quantization methods, one file per paper, and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffquant.errors import ConfigError
from diffquant.methods import naive, ptq4dm
from diffquant.methods.base import CalibrationConfig, MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    config_class: type[MethodConfig]
    apply: Callable
    summary: str


METHODS: dict[str, MethodEntry] = {
    "naive": MethodEntry(naive.NaiveConfig, naive.apply, "round-to-nearest PTQ with min-max/MSE observers"),
    "ptq4dm": MethodEntry(ptq4dm.PTQ4DMConfig, ptq4dm.apply, "PTQ4DM: NDTC calibration + MSE ranges (CVPR 2023)"),
}


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'. Available methods: {', '.join(METHODS)}.")
    return METHODS[name]


def make_config(name: str, **values) -> MethodConfig:
    """A method's config with the paper's defaults, changed by `values`."""
    config_class = get_method(name).config_class
    unknown = set(values) - set(config_class.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"Method '{name}' has no option(s) {', '.join(sorted(unknown))}.")
    config = config_class(**values)
    config.validate()
    return config


__all__ = ["METHODS", "CalibrationConfig", "MethodConfig", "MethodEntry", "get_method", "make_config"]
