"""Runtime backends, one file each, behind a name -> class table (`get_backend`, `register_backend`)."""

# registration order is the order in which `--backend` lists them
# isort: off
from diffquant.runtime.backends import fake  # noqa: F401  (each import registers its backend)
from diffquant.runtime.backends import onednn  # noqa: F401
from diffquant.runtime.backends import inductor  # noqa: F401
from diffquant.runtime.backends import cuda  # noqa: F401
from diffquant.runtime.backends import openvino  # noqa: F401

# isort: on
from diffquant.runtime.backends.base import (
    BACKEND_CLASSES,
    DEFAULT_WEIGHT_ONLY_MODE,
    SIMULATION,
    WEIGHT_ONLY_MODES,
    Backend,
    get_backend,
    needs_compile,
    register_backend,
    weight_only_layer,
)

__all__ = [
    "BACKEND_CLASSES",
    "DEFAULT_WEIGHT_ONLY_MODE",
    "SIMULATION",
    "WEIGHT_ONLY_MODES",
    "Backend",
    "get_backend",
    "needs_compile",
    "register_backend",
    "weight_only_layer",
]
