"""What a runtime backend is, and the table that maps backend names to backend classes.

A backend (diffusers' `DiffusersQuantizer` + `AUTO_QUANTIZER_MAPPING`, our own way) says whether it runs
on this machine (`check_available`), which quantized layers it converts (`supports`, usually by layer
kind name) and how (`convert`). `runtime/export.py` asks it for every quantized layer (`QuantLayer`; a
layer kind made of several, like the split conv, is converted part by part) and leaves the layers it
does not support as the fake-quant simulation. A new backend is one file in this folder (or one class
in user code) decorated with `@register_backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.layers import QuantLayer
from diffquant.runtime.kernels import DequantizedLayer, PackedWeightLayer
from diffquant.runtime.kernels_int4 import PackedInt4Layer, int4_weight_supported

# Weight-only layers: "packed" keeps <= 4-bit integer weights nibble-packed and decodes them at every
# call into bf16 where the CPU has bf16 matrix units (fp32 elsewhere) - the default, since on such CPUs
# it is both faster than fp32 weights decoded at load and ~1/8 of their memory (benchmarks/
# realsize_speed.py); other weight-only layers fall back to at-load. "at-load" decodes once into fp32
# (bit-exact with the simulation), "on-the-fly" decodes any 1/2/4/8-bit packing in fp32 per call, and
# "int4-kernel" runs linears on PyTorch's CPU int4 GEMM (fast only for a few rows).
WEIGHT_ONLY_MODES = ("packed", "at-load", "on-the-fly", "int4-kernel")
DEFAULT_WEIGHT_ONLY_MODE = "packed"

SIMULATION = "fake-quant simulation"
"""The kernel name of a layer left as it is (the fake backend, or a layer a backend does not support)."""


class Backend:
    """A runtime target for quantized layers. Subclasses set `name` and override what they do."""

    name: ClassVar[str]
    device: ClassVar[str] = "cpu"
    """Where the exported model runs (it is moved there after conversion)."""
    freezes: ClassVar[bool] = False
    """Whether its kernels are lowered by inductor from constant weights: the model is then compiled with
    inductor freezing, and the per-step clock goes into the graph as an input (a frozen buffer would not move)."""
    integer_attention: ClassVar[bool] = True
    """Whether quantized attention matmuls may run on exact integer GEMMs (`export_model(integer_attention=)`)."""
    runs_graph: ClassVar[bool] = False
    """Whether the backend runs the whole converted model itself (`wrap`): the torch model then stays in
    float32, the compute dtype goes to `wrap`, and `compile=True` is ignored (the backend compiles)."""

    def check_available(self) -> None:
        """Raise one DiffquantError naming what is missing and which backend to use instead."""

    def supports(self, layer: QuantLayer) -> bool:
        """Whether `convert` handles this quantized layer (others stay the fake-quant simulation)."""
        return False

    def convert(self, layer: QuantLayer, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
        """The deployed module replacing `layer`; it names its kernel in `.kernel`."""
        raise DiffquantError(f"The {self.name} backend converts no layers; it left '{layer.kind}' as it is.")

    def finish(self, model: nn.Module) -> None:
        """Passes over the converted model (fusing neighbouring kernels); none by default."""

    written_files: ClassVar[tuple[str, ...]] = ()
    """Names `write_files` writes into an exported directory (left out when that directory is exported again)."""

    def write_files(self, denoiser: nn.Module, calls: list[dict[str, Any]], directory: Path) -> dict[str, Any]:
        """Files beside an exported directory (the openvino backend: its graph as OpenVINO IR), written from
        the deployed `denoiser` and probe calls (keyword arguments; the first converts, the others check);
        returns what `export.json` records about them. None by default."""
        return {}

    def wrap(self, model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
        """The module that runs the converted model (backends with `runs_graph`); the model itself by default."""
        return model


def weight_only_layer(layer: QuantLayer, weight_only_mode: str) -> nn.Module:
    """The deployed form of a layer that runs with float activations (see WEIGHT_ONLY_MODES)."""
    if weight_only_mode in ("packed", "int4-kernel") and int4_weight_supported(layer):
        return PackedInt4Layer(layer)
    if weight_only_mode == "on-the-fly" and PackedWeightLayer.supports(layer):
        return PackedWeightLayer(layer)
    return DequantizedLayer(layer)


BACKEND_CLASSES: dict[str, type[Backend]] = {}
"""Backend name -> class, filled by `register_backend` (the built-in ones in this folder)."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a `Backend` subclass available under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not issubclass(cls, Backend):
        raise DiffquantError(f"{cls.__name__} cannot be a backend: subclass Backend and set a `name`.")
    if name in BACKEND_CLASSES:
        raise DiffquantError(
            f"A backend named '{name}' is already registered ({BACKEND_CLASSES[name].__qualname__}); "
            f"give {cls.__qualname__} another `name`."
        )
    BACKEND_CLASSES[name] = cls
    return cls


def needs_compile(name: str | None) -> bool:
    """Whether the backend registered under `name` has its kernels only compiled (`Backend.freezes`)."""
    return name in BACKEND_CLASSES and BACKEND_CLASSES[name].freezes


def get_backend(name: str) -> Backend:
    """The backend registered under `name`; an unknown name is one clear error listing the known ones."""
    if name not in BACKEND_CLASSES:
        raise DiffquantError(f"Unknown backend '{name}'. Choose one of: {', '.join(BACKEND_CLASSES)}.")
    return BACKEND_CLASSES[name]()
