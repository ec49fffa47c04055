"""Export a diffquant-quantized model to real kernels.

Backends (one file each in runtime/backends/; `register_backend` adds more):
* `fake` - the simulation itself (every method, every format);
* `onednn` - CPU: int8 convolutions and linears on oneDNN (`qconv2d_pointwise`, `qlinear_pointwise`)
  for layers with <= 8-bit symmetric per-channel weights and static per-tensor <= 8-bit inputs; other
  layers run in float with their weights decoded once at load;
* `inductor` - CPU: the same int8 layers written in PT2E's reference form and lowered by inductor's own
  quantization passes to the same oneDNN kernels (GELU and residual-add post-ops fused by inductor);
  its kernels exist only compiled (with inductor freezing, the per-step clock passed in as an input);
* `cuda` - GPU: int8 linears on `torch._int_mm`, fp8 (E4M3) linears on `torch._scaled_mm`; convolutions
  decoded to float;
* `openvino` - CPU: the whole denoiser converted with OpenVINO, our grids in the FakeQuantize / int8
  weight form its low-precision passes run on int8, compiled by OpenVINO per input signature on first
  call (its fused attention included; `openvino` extra).
Layer kinds built from several parts are converted part by part; what a kind computes itself (the
low-rank kind's smoothing divide and its float branch, `LayerKind.float_paths`) stays a float op beside
the kernels and is counted in the kernel report as well (docs/DEPLOYMENT.md: what runs how).
Attention matmuls that a method quantized (Q-Diffusion, EDA-DM) keep their fake-quantized operands by
default: compiled, inductor fuses that into the softmax pass and it measured faster on CPU than the
exact integer-GEMM processor (`integer_attention=True`, `kernels_attention.py`: 0.50x at the fmnist DiT's
attention size, 0.75x at PixArt's, both compiled, one thread); unquantized ones stay on float SDPA.

`compile=True` wraps the result in `torch.compile`; per-step activation parameters read a shared clock
tensor that the wrapper sets from the step context, so the graph is compiled once, not per step.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch._inductor.config as inductor_config
from diffusers.models.attention_processor import Attention
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.model import DiffusionModel
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.modules.kinds import is_kind
from diffquant.modules.surgery import quant_layers
from diffquant.quant import Quantizer, current_step
from diffquant.runtime.backends import (
    BACKEND_CLASSES,
    DEFAULT_WEIGHT_ONLY_MODE,
    SIMULATION,
    WEIGHT_ONLY_MODES,
    Backend,
    get_backend,
    register_backend,
)
from diffquant.runtime.kernels import StepClock, _InputQuantizer
from diffquant.runtime.kernels_attention import Int8AttnProcessor, attention_supported
from diffquant.runtime.kernels_int4 import bf16_matmul_supported
from diffquant.runtime.storage import argument_names, cast_float_inputs

BACKENDS = BACKEND_CLASSES
"""The backend names (a live view of the registry in runtime/backends/, user backends included)."""

__all__ = [
    "BACKENDS",
    "DEFAULT_WEIGHT_ONLY_MODE",
    "WEIGHT_ONLY_MODES",
    "Backend",
    "DeployedDenoiser",
    "check_backend",
    "export_model",
    "register_backend",
]


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What the layers around the kernels compute in: float32 (the simulation's numerics) or bfloat16."""


def _float32_output(output):
    """A denoiser's output (tensor, tuple or diffusers output object) with its tensors back in float32."""
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, tuple):
        return tuple(_float32_output(v) for v in output)
    if hasattr(output, "sample"):  # diffusers' BaseOutput
        output.sample = output.sample.float()
    return output


class _ClockedCall(nn.Module):
    """The inner model with the step clock set inside the graph from an input: under inductor freezing
    every buffer is a constant, so a clock set from outside would stay at its value at compile time."""

    def __init__(self, inner: nn.Module, clock: StepClock) -> None:
        super().__init__()
        self.inner, self.clock = inner, clock

    def forward(self, clock_value: torch.Tensor, /, *args, **kwargs):  # positional-only: callers pass `timestep`
        self.clock.timestep.copy_(clock_value)
        return self.inner(*args, **kwargs)


COMPILED_COPIES = 256
"""Recompiles dynamo allows per code object once a deployed model compiles (its default is 8)."""


def allow_many_compiled_copies() -> None:
    """Every compiled model is another copy of the same diffusers classes, and dynamo keeps one cache per
    code object: past its limit (8) it silently runs eager. Raise that limit for the process."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_COPIES)


class DeployedDenoiser(nn.Module):
    """The converted model, optionally compiled, behind the diffusers call signature. With a bfloat16
    compute dtype it takes and returns float32 like the simulation (timesteps and positions stay float32).
    `freezing` compiles with inductor freezing (backends whose kernels inductor lowers from constants)."""

    def __init__(
        self,
        inner: nn.Module,
        clock: StepClock,
        compile: bool,
        compute_dtype: torch.dtype = torch.float32,
        freezing: bool = False,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.clock = clock
        self.compute_dtype = compute_dtype
        self._argument_names = argument_names(inner)
        self._clocked = compile and freezing
        if compile:
            allow_many_compiled_copies()
        if self._clocked:
            self._call = torch.compile(_ClockedCall(inner, clock), dynamic=False)
        else:
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
        if self.compute_dtype != torch.float32:
            args, kwargs = cast_float_inputs(self._argument_names, args, kwargs, self.compute_dtype)
        if self._clocked:
            # dynamo reads the freezing flag while tracing (params as constants), so it is on for every call
            # that may compile, and for nothing else
            with inductor_config.patch(freezing=True):
                output = self._call(self.clock.timestep.clone(), *args, **kwargs)
        else:
            output = self._call(*args, **kwargs)
        return output if self.compute_dtype == torch.float32 else _float32_output(output)


def check_backend(backend: str) -> None:
    """Raise one clear error when `backend` is unknown or cannot run on this machine."""
    get_backend(backend).check_available()


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


def _compute_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float layers around the kernels (norms, embeddings, layers left in float) to `dtype` and
    let the int8 kernels write it: no float32 pass is left between them. Quantization grids stay float32
    (quantizers, and the buffers of kernels that say `keeps_float32_state`: scales, zero-points, per-step
    banks); a kernel's bias follows the model, so diffusers' dtype probes (the first parameter) see it."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if hasattr(module, "out_dtype"):
            module.out_dtype = dtype
        if isinstance(module, Quantizer):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        if getattr(module, "keeps_float32_state", False):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def _check_compute_dtype(compute_dtype: str, target: Backend) -> torch.dtype:
    if compute_dtype not in COMPUTE_DTYPES:
        raise DiffquantError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got '{compute_dtype}'.")
    if compute_dtype == "bfloat16" and target.device == "cpu" and not bf16_matmul_supported():
        raise DiffquantError(
            "compute_dtype='bfloat16' needs a CPU with bfloat16 matrix units (AVX512-BF16 or AMX), which this "
            "one lacks: bfloat16 would run slower than float32 here. Use compute_dtype='float32'."
        )
    return COMPUTE_DTYPES[compute_dtype]


def export_model(
    model: DiffusionModel,
    backend: str = "onednn",
    compile: bool = False,
    weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE,
    integer_attention: bool = False,
    compute_dtype: str = "float32",
) -> DiffusionModel:
    """A copy of a quantized `model` running on `backend`'s kernels; `quantization['kernels']` says
    how many layers run on which kernel. `integer_attention` runs quantized attention matmuls on exact
    integer GEMMs (opt-in: slower than the compiled fake-quant form on CPU, see the module docstring).
    `compute_dtype="bfloat16"` runs everything around the int8 kernels in bfloat16 and lets the kernels
    write bfloat16: faster on CPUs with bfloat16 matrix units, at bfloat16's rounding (about 1e-2
    relative) away from the float32 simulation; the model still takes and returns float32."""
    target = get_backend(backend)
    target.check_available()
    if weight_only_mode not in WEIGHT_ONLY_MODES:
        raise DiffquantError(
            f"weight_only_mode must be one of {', '.join(WEIGHT_ONLY_MODES)}, got '{weight_only_mode}'."
        )
    dtype = _check_compute_dtype(compute_dtype, target)
    if model.quantization is None:
        raise DiffquantError("export_model takes a quantized model: run diffquant.quantize() first.")
    inner = copy.deepcopy(model.denoiser.inner if isinstance(model.denoiser, DeployedDenoiser) else model.denoiser)
    layers = [(name, layer.kind) for name, layer in quant_layers(inner)]
    for name, layer in list(quant_layers(inner)):
        if target.supports(layer):  # the rest stay the fake-quant simulation
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, target.convert(layer, weight_only_mode=weight_only_mode))
    target.finish(inner)
    if integer_attention and target.integer_attention:
        layers += _integer_attention(inner)
    # counted once every fusion is done: each converted layer names its kernel and epilogue
    kernels = Counter(f"{kind}: {getattr(inner.get_submodule(name), 'kernel', SIMULATION)}" for name, kind in layers)
    # what layer kinds compute themselves beside their converted parts (the low-rank branch, ...)
    kernels.update(
        f"{module.kind} {path}: {how}"
        for module in inner.modules()
        if is_kind(module)
        for path, how in module.float_paths().items()
    )
    clock = StepClock()
    if target.device != "cpu":
        inner, clock = inner.to(target.device), clock.to(target.device)
    for module in inner.modules():  # after any device move: buffers must share one tensor
        if hasattr(module, "attach_clock"):
            module.attach_clock(clock.timestep)
    _share_step_banks(inner)
    if target.runs_graph:  # the backend compiles and runs the graph, in its own precision
        compile = False
        denoiser = DeployedDenoiser(target.wrap(inner.eval(), dtype), clock, compile=False)
    else:
        _compute_in(inner, dtype)
        denoiser = DeployedDenoiser(inner.eval(), clock, compile, dtype, freezing=target.freezes)
    record = {
        **model.quantization,
        "backend": backend,
        "compiled": compile,
        "weight_only_mode": weight_only_mode,
        "compute_dtype": compute_dtype,
        "kernels": dict(kernels),
    }
    return DiffusionModel(denoiser, model.info, model.scheduler_config, model.path, record, model.pipeline)
