"""Quantization methods, one file per paper, and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffquant.errors import ConfigError
from diffquant.methods import dgq, edadm, mixdq, naive, ptq4dm, qdiffusion, svdquant, tfmq, viditq
from diffquant.methods.base import CalibrationConfig, MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    config_class: type[MethodConfig]
    apply: Callable
    summary: str


METHODS: dict[str, MethodEntry] = {
    "naive": MethodEntry(naive.NaiveConfig, naive.apply, "round-to-nearest PTQ with min-max/MSE observers"),
    "ptq4dm": MethodEntry(ptq4dm.PTQ4DMConfig, ptq4dm.apply, "PTQ4DM: NDTC calibration + MSE ranges (CVPR 2023)"),
    "qdiffusion": MethodEntry(
        qdiffusion.QDiffusionConfig, qdiffusion.apply, "Q-Diffusion: split shortcut + BRECQ reconstruction (ICCV 2023)"
    ),
    "tfmq": MethodEntry(
        tfmq.TFMQConfig, tfmq.apply, "TFMQ-DM: temporal block reconstruction + per-step ranges (CVPR 2024)"
    ),
    "edadm": MethodEntry(
        edadm.EDADMConfig, edadm.apply, "EDA-DM: TDAC calibration + fine-grained block reconstruction"
    ),
    "svdquant": MethodEntry(
        svdquant.SVDQuantConfig, svdquant.apply, "SVDQuant: smoothing + 16-bit low-rank branch + GPTQ, W4A4 (ICLR 2025)"
    ),
    "viditq": MethodEntry(
        viditq.ViDiTQConfig,
        viditq.apply,
        "ViDiT-Q: dynamic per-token activations, scaling + rotation balancing, metric-decoupled MP (ICLR 2025)",
    ),
    "mixdq": MethodEntry(
        mixdq.MixDQConfig,
        mixdq.apply,
        "MixDQ: BOS-aware text quantization, metric-decoupled sensitivity, integer-program bits (ECCV 2024)",
    ),
    "dgq": MethodEntry(
        dgq.DGQConfig, dgq.apply, "DGQ: distribution-aware activation groups, log2 softmax, BOS kept float (ICLR 2025)"
    ),
}


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'. Available methods: {', '.join(METHODS)}.")
    return METHODS[name]


def make_config(name: str, preset: str | None = None, **values) -> MethodConfig:
    """A method's config: the preset's defaults ('fast' where a method has one), changed by `values`.

    Nested settings (`calibration`, `reconstruction`) may be given as dicts of the fields to change.
    """
    config = get_method(name).config_class.from_preset(preset, **values)
    config.validate()
    return config


__all__ = ["METHODS", "CalibrationConfig", "MethodConfig", "MethodEntry", "get_method", "make_config"]
