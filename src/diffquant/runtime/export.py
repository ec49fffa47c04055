"""Export a diffquant-quantized model to real kernels.

Backends:
* `fake` - the simulation itself (every method, every format);
* `onednn` - CPU: int8 convolutions and linears on oneDNN (`qconv2d_pointwise`, `qlinear_pointwise`)
  for layers with <= 8-bit symmetric per-channel weights and static per-tensor <= 8-bit inputs; other
  layers run in float with their weights decoded once at load;
* `cuda` - GPU: int8 linears on `torch._int_mm`, fp8 (E4M3) linears on `torch._scaled_mm`; convolutions
  decoded to float.
Attention matmuls that a method quantized (Q-Diffusion, EDA-DM) keep their fake-quantized operands by
default: compiled, inductor fuses that into the softmax pass and it measured faster on CPU than the
exact integer-GEMM processor (`integer_attention=True`, `kernels_attention.py`: 0.50x at the fmnist DiT's
attention size, 0.75x at PixArt's, both compiled, one thread); unquantized ones stay on float SDPA.

`compile=True` wraps the result in `torch.compile`; per-step activation parameters read a shared clock
tensor that the wrapper sets from the step context, so the graph is compiled once, not per step.
"""

from __future__ import annotations

import copy
import platform
from collections import Counter

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.model import DiffusionModel
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.modules.layers import QuantConv2d, QuantLinear
from diffquant.modules.surgery import quant_layers
from diffquant.quant import FloatFormat, current_step
from diffquant.runtime.kernels import (
    DequantizedLayer,
    FusedGELU,
    IntMMLinear,
    OneDNNInt8Conv2d,
    OneDNNInt8Linear,
    PackedWeightLayer,
    ScaledMMFloat8Linear,
    StepClock,
    _InputQuantizer,
    input_supported,
    weight_supported,
)
from diffquant.runtime.kernels_attention import Int8AttnProcessor, attention_supported
from diffquant.runtime.kernels_int4 import (
    Int4PackMMLinear,
    PackedInt4Layer,
    int4_weight_supported,
    int4pack_group_size,
)

BACKENDS = ("fake", "onednn", "cuda")


class DeployedDenoiser(nn.Module):
    """The converted model, optionally compiled, behind the diffusers call signature."""

    def __init__(self, inner: nn.Module, clock: StepClock, compile: bool) -> None:
        super().__init__()
        self.inner = inner
        self.clock = clock
        self._call = torch.compile(inner, dynamic=False) if compile else inner

    @property
    def config(self):
        return self.inner.config

    # pipelines ask their components for these (diffusers' ModelMixin has them; a plain Module does not)
    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, *args, **kwargs):  # passes keywords through: families call by keyword
        step = current_step()
        if step is not None:
            self.clock.set(step.timestep)
        return self._call(*args, **kwargs)


def check_backend(backend: str) -> None:
    """Raise one clear error when `backend` cannot run on this machine."""
    if backend not in BACKENDS:
        raise DiffquantError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    if backend == "onednn":
        machine = platform.machine().lower()
        if not torch.backends.mkldnn.is_available() or machine not in ("x86_64", "amd64"):
            raise DiffquantError(
                f"The onednn backend needs an x86-64 CPU with PyTorch's oneDNN (this is {machine}); use --backend fake."
            )
        if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
            raise DiffquantError("This PyTorch build lacks oneDNN's quantized ops; use --backend fake.")
    if backend == "cuda" and not torch.cuda.is_available():
        raise DiffquantError(
            "The cuda backend needs a CUDA GPU and a CUDA build of PyTorch, and this machine has none; "
            "use --backend onednn (CPU int8) or fake."
        )


# Weight-only layers: "packed" keeps <= 4-bit integer weights nibble-packed and decodes them at every
# call into bf16 where the CPU has bf16 matrix units (fp32 elsewhere) - the default, since on such CPUs
# it is both faster than fp32 weights decoded at load and ~1/8 of their memory (benchmarks/
# realsize_speed.py); other weight-only layers fall back to at-load. "at-load" decodes once into fp32
# (bit-exact with the simulation), "on-the-fly" decodes any 1/2/4/8-bit packing in fp32 per call, and
# "int4-kernel" runs linears on PyTorch's CPU int4 GEMM (fast only for a few rows).
WEIGHT_ONLY_MODES = ("packed", "at-load", "on-the-fly", "int4-kernel")
DEFAULT_WEIGHT_ONLY_MODE = "packed"


def _convert_layer(layer, backend: str, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
    int8_ready = weight_supported(layer) and input_supported(layer.input_quantizer)
    if backend == "onednn" and int8_ready:
        return OneDNNInt8Conv2d(layer) if isinstance(layer, QuantConv2d) else OneDNNInt8Linear(layer)
    if backend == "cuda" and isinstance(layer, QuantLinear):
        if int8_ready:
            return IntMMLinear(layer)
        weight_fmt = layer.weight_quantizer.fmt if layer.weight_quantizer else None
        input_fmt = layer.input_quantizer.fmt if layer.input_quantizer else None
        if (
            isinstance(weight_fmt, FloatFormat)
            and weight_fmt.name == "e4m3"
            and isinstance(input_fmt, FloatFormat)
            and input_fmt.name == "e4m3"
            and layer.input_quantizer.grouping.kind == "per_tensor"
            and not layer.input_quantizer.spec.per_step
        ):
            return ScaledMMFloat8Linear(layer)
    if backend == "onednn" and weight_only_mode == "int4-kernel" and int4pack_group_size(layer) is not None:
        return Int4PackMMLinear(layer)
    if weight_only_mode in ("packed", "int4-kernel") and int4_weight_supported(layer):
        return PackedInt4Layer(layer)
    if weight_only_mode == "on-the-fly" and PackedWeightLayer.supports(layer):
        return PackedWeightLayer(layer)
    return DequantizedLayer(layer)


def _fuse_activations(model: nn.Module) -> None:
    """Fold diffusers' GELU activations into the int8 GEMM before them (a oneDNN post-op): a separate
    tanh-GELU pass costs more than the int8 GEMM itself on CPU."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GELU) and isinstance(module.proj, OneDNNInt8Linear) and module.proj.takes_epilogue:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FusedGELU(module.proj, module.approximate))


def _chain_int8_outputs(model: nn.Module) -> None:
    """Inside diffusers' FeedForward (GELU projection -> dropout -> linear), let the first int8 GEMM
    write uint8 codes for the second: the intermediate is the widest activation of a transformer block
    and would otherwise go through memory as float32 only to be quantized again."""
    for module in model.modules():
        if not isinstance(module, FeedForward):
            continue
        layers = [m for m in module.net if not isinstance(m, nn.Dropout)]  # dropout is the identity in eval
        for producer, consumer in zip(layers, layers[1:], strict=False):
            gemm = producer.proj if isinstance(producer, FusedGELU) else producer
            if isinstance(gemm, OneDNNInt8Linear) and isinstance(consumer, OneDNNInt8Linear):
                gemm.emit_codes_for(consumer)


def _integer_attention(model: nn.Module) -> list[tuple[str, str]]:
    """Give attention modules whose matmuls a method quantized the integer-GEMM processor; returns
    (name, kind) of each, for the kernel count."""
    converted = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        quantized = isinstance(module, Attention) and isinstance(processor, QuantAttnProcessor)
        if quantized and processor._active() and attention_supported(processor):
            module.set_processor(Int8AttnProcessor(processor))
            converted.append((f"{name}.processor", "attention"))
    return converted


def _share_step_banks(model: nn.Module) -> None:
    """Point every per-step grid with the same calibrated timesteps at one tensor: the compiled graph
    then finds the step's row (argmin over the bank) once per call instead of once per layer."""
    banks: list[torch.Tensor] = []
    for module in model.modules():
        bank = getattr(module, "bank_timesteps", None)
        if not isinstance(module, _InputQuantizer) or not module.per_step or bank is None:
            continue
        shared = next((b for b in banks if b.shape == bank.shape and torch.equal(b, bank)), None)
        if shared is None:
            banks.append(bank)
        else:
            module.bank_timesteps = shared


def export_model(
    model: DiffusionModel,
    backend: str = "onednn",
    compile: bool = False,
    weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE,
    integer_attention: bool = False,
) -> DiffusionModel:
    """A copy of a quantized `model` running on `backend`'s kernels; `quantization['kernels']` says
    how many layers run on which kernel. `integer_attention` runs quantized attention matmuls on exact
    integer GEMMs (opt-in: slower than the compiled fake-quant form on CPU, see the module docstring)."""
    check_backend(backend)
    if weight_only_mode not in WEIGHT_ONLY_MODES:
        raise DiffquantError(
            f"weight_only_mode must be one of {', '.join(WEIGHT_ONLY_MODES)}, got '{weight_only_mode}'."
        )
    if model.quantization is None:
        raise DiffquantError("export_model takes a quantized model: run diffquant.quantize() first.")
    inner = copy.deepcopy(model.denoiser.inner if isinstance(model.denoiser, DeployedDenoiser) else model.denoiser)
    layers = [(name, layer.kind) for name, layer in quant_layers(inner)]
    if backend != "fake":
        for name, layer in list(quant_layers(inner)):
            converted = _convert_layer(layer, backend, weight_only_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent_name) if parent_name else inner, child, converted)
        _fuse_activations(inner)
        _chain_int8_outputs(inner)
        if integer_attention:
            layers += _integer_attention(inner)
        # counted once every fusion is done: each converted layer names its kernel and epilogue
        kernels = Counter(f"{kind}: {inner.get_submodule(name).kernel}" for name, kind in layers)
    else:
        kernels = Counter(f"{kind}: fake-quant simulation" for _, kind in layers)
    clock = StepClock()
    if backend == "cuda":
        inner, clock = inner.cuda(), clock.cuda()
    for module in inner.modules():  # after any device move: buffers must share one tensor
        if hasattr(module, "attach_clock"):
            module.attach_clock(clock.timestep)
    _share_step_banks(inner)
    denoiser = DeployedDenoiser(inner.eval(), clock, compile)
    record = {
        **model.quantization,
        "backend": backend,
        "compiled": compile,
        "weight_only_mode": weight_only_mode,
        "kernels": dict(kernels),
    }
    return DiffusionModel(denoiser, model.info, model.scheduler_config, model.path, record, model.pipeline)
