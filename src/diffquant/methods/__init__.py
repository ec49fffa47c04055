"""Quantization methods, one file per paper; each registers itself (`@register_method` in registry.py)."""

from __future__ import annotations

# importing a method file registers it; the import order is the order methods are listed in
# isort: off
from diffquant.methods import naive  # noqa: F401
from diffquant.methods import ptq4dm  # noqa: F401
from diffquant.methods import qdiffusion  # noqa: F401
from diffquant.methods import tfmq  # noqa: F401
from diffquant.methods import edadm  # noqa: F401
from diffquant.methods import svdquant  # noqa: F401
from diffquant.methods import viditq  # noqa: F401
from diffquant.methods import mixdq  # noqa: F401
from diffquant.methods import dgq  # noqa: F401

# isort: on
from diffquant.methods.base import CalibrationConfig, MethodConfig
from diffquant.methods.registry import (
    METHODS,
    MethodEntry,
    get_method,
    make_config,
    method_for_config,
    register_method,
)

__all__ = [
    "METHODS",
    "CalibrationConfig",
    "MethodConfig",
    "MethodEntry",
    "get_method",
    "make_config",
    "method_for_config",
    "register_method",
]
