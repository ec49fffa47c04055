"""The openvino backend's parts: layers in the form OpenVINO's low-precision passes run as int8, and the
denoiser wrapper that converts the model with OpenVINO and runs it on OpenVINO's CPU runtime.

Each int8 layer states our calibrated grids in the two forms OpenVINO's PyTorch frontend and its
low-precision transformations (LPT) recognize: the input through `fake_quantize_per_tensor_affine` (an
OpenVINO FakeQuantize), the weight as int8 codes times per-channel scales (Constant i8 -> Convert ->
Multiply, OpenVINO's weight-dequantization pattern). OpenVINO then runs the GEMM or convolution on int8
with the int8 weights as stored: the same numbers as the simulation (up to the tie rounding of x / s),
OpenVINO's kernels and fusions (its attention kernel included).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import fields, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from diffquant.errors import DiffquantError
from diffquant.modules.attention import TORCH_SDPA, additive_mask
from diffquant.modules.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.profiling import current_rss_bytes
from diffquant.quant import current_step
from diffquant.runtime.kernels import int8_weight, undo_conv_weight_shift, undo_weight_shift

PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}
"""compute dtype -> OpenVINO's CPU inference precision hint (what the float ops around int8 run in)."""


def integral_zero_point(quantizer) -> bool:
    """Whether a per-tensor input grid has an integer zero-point (FakeQuantize's grid has one)."""
    zero = quantizer.zero_point.detach().reshape(-1)
    return bool(torch.equal(zero, zero.round()))


class OpenVINOFakeQuantize(nn.Module):
    """A static per-tensor integer grid as `fake_quantize_per_tensor_affine`: an OpenVINO FakeQuantize,
    which OpenVINO's low-precision passes fold into the int8 op that reads it.

    A per-step grid (TFMQ-DM, DGQ) keeps its whole bank: a trace bakes in the row `row` says, and the
    runner traces one graph per row (`OpenVINODenoiser`), picking the row from the shared step clock."""

    enabled = True  # stands in for an enabled Quantizer (attention processors ask)

    def __init__(self, quantizer) -> None:
        super().__init__()
        offset = 128 if quantizer.fmt.signed else 0  # signed grids shift into uint8, the zero-point with them
        scales = quantizer.step_size().detach().reshape(-1).tolist()  # one per calibrated step if per-step
        zeros = quantizer.zero_point.detach().reshape(-1).round().to(torch.int64).tolist()
        self.bank = [(scale, zero + offset) for scale, zero in zip(scales, zeros, strict=True)]
        self.low, self.high = quantizer.fmt.qmin + offset, quantizer.fmt.qmax + offset
        self.per_step = quantizer.spec.per_step
        self.row = 0
        self.register_buffer("clock", None, persistent=False)
        if self.per_step:
            self.register_buffer("bank_timesteps", quantizer.bank_timesteps.detach().float().clone())

    @property
    def scale(self) -> float:
        return self.bank[self.row][0]

    @property
    def zero(self) -> int:
        return self.bank[self.row][1]

    def attach_clock(self, clock: torch.Tensor) -> None:
        """Share the deployed model's clock tensor (set in place before every call)."""
        if self.per_step:
            self.clock = clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero, self.low, self.high).to(x.dtype)


def _centring_shift(quantizer: Any) -> tuple[int, float]:
    """(centre code, c): c = (z - centre) s moves an OpenVINO grid onto the symmetric range of its codes;
    c = 0 for a grid already centred or one that is not an OpenVINO FakeQuantize."""
    if not isinstance(quantizer, OpenVINOFakeQuantize):
        return 0, 0.0
    centre = (quantizer.low + quantizer.high + 1) // 2
    return centre, (quantizer.zero - centre) * quantizer.scale


def _symmetric_shift(quantizer: Any, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(FQ(x) + c, c), with c from `_centring_shift`: x rounded on the centred grid, so that OpenVINO sees
    a FakeQuantize without zero-point. The same codes as FQ(x) up to float rounding at ties (as the tie
    rounding of x / s everywhere here)."""
    centre, shift = _centring_shift(quantizer)
    if not shift:
        return (quantizer(x) if quantizer is not None else x), 0.0
    codes = torch.fake_quantize_per_tensor_affine(
        x.float() + shift, quantizer.scale, centre, quantizer.low, quantizer.high
    )
    return codes.to(x.dtype), shift


class OpenVINOAttention:
    """softmax(s QK^T + mask) V over the quantized operands, in the form OpenVINO's int8 attention takes.

    OpenVINO folds FakeQuantize into its int8 attention kernel only for grids without zero-point; with
    one it dequantizes and runs that attention in float (PixArt's self-attention 19 % slower). Affine
    grids (Q-Diffusion's, EDA-DM's) therefore run on the symmetric range of the same codes, X' = X + c_X,
    and each shift is undone where it lands, exactly:

    - K' adds s c_K sum_d Q_d to every score of a query row: softmax ignores a constant per row;
    - Q' adds s c_Q sum_d K'_d to every score of a key column: subtracted as an additive mask;
    - V' adds c_V times the row's sum of probabilities to the output: 1 for float probabilities; for
      quantized ones (whose rows do not sum to 1) V gets an extra column that V' maps to c_V, so the
      attention kernel itself returns that sum times c_V beside the output.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, query, key, value, mask, is_causal: bool, scale: float | None) -> torch.Tensor:
        processor = self.processor
        factor = scale if scale is not None else query.shape[-1] ** -0.5  # traced shapes stay tensors
        query, query_shift = _symmetric_shift(processor.query_quantizer, query)
        key, _ = _symmetric_shift(processor.key_quantizer, key)  # a constant per score row
        if query_shift:
            column_term = (-query_shift * factor) * key.sum(-1).unsqueeze(-2)
            # SDPA takes a mask or is_causal, not both: one additive mask carries all of them
            shape = (query.shape[-2], key.shape[-2])
            mask = additive_mask(mask, is_causal, shape, column_term.dtype, column_term.device)
            mask, is_causal = (column_term if mask is None else mask + column_term), False
        probs = processor.probs_quantizer
        if probs is None or not probs.enabled:
            value, value_shift = _symmetric_shift(processor.value_quantizer, value)
            out = TORCH_SDPA(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale)
            return out - value_shift if value_shift else out
        probabilities = processor.probabilities(torch.matmul(query, key.transpose(-1, -2)) * factor, mask, is_causal)
        if not _centring_shift(processor.value_quantizer)[1]:
            return torch.matmul(probabilities, _symmetric_shift(processor.value_quantizer, value)[0])
        # a zero column, which V' maps to c_V: the kernel returns c_V * sum(P) beside the output
        padded, _ = _symmetric_shift(processor.value_quantizer, F.pad(value, (0, 1)))
        out = torch.matmul(probabilities, padded)
        return out[..., :-1] - out[..., -1:]


class _OpenVINOInt8(nn.Module):
    """What the linear and the convolution share: int8 weight codes, their scales and the input grid."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        weight = self._store_weight(layer)
        self.input = OpenVINOFakeQuantize(layer.input_quantizer)
        self.register_buffer("input_sum_weight", weight.input_sum_weight)

    def _store_weight(self, layer: QuantLayer):
        """Int8 codes, per-channel scales (shaped for broadcasting) and bias; returns the `Int8Weight`."""
        weight = int8_weight(layer)
        self.weight_shape = tuple(layer._frozen_shape)  # the float layer's, for what sits beside it (LoRA)
        self.channel_shape = (-1, *([1] * (weight.values.ndim - 1)))
        self.register_buffer("weight_values", weight.values)
        self.register_buffer("weight_scale", weight.scale.reshape(self.channel_shape).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return weight

    def _weight(self) -> torch.Tensor:
        return self.weight_values.float() * self.weight_scale


class OpenVINOInt8Linear(_OpenVINOInt8):
    """Linear with a FakeQuantize input and int8 weight codes: OpenVINO's FullyConnected on int8."""

    kernel = "openvino int8 FullyConnected"

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        self.out_features = self.weight_values.shape[0]  # read by LoRA and the model-surgery code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantized = self.input(x)
        out = F.linear(dequantized, self._weight(), self.bias)
        if self.input_sum_weight is None:
            return out
        return undo_weight_shift(out, dequantized, self.input_sum_weight)


class OpenVINOInt8Conv2d(_OpenVINOInt8):
    """Conv2d with a FakeQuantize input and int8 weight codes: OpenVINO's convolution on int8."""

    kernel = "openvino int8 Convolution"

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__(layer)
        self.conv_args = (tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
        self.register_buffer("window", torch.ones(1, 1, *layer.kernel_size))
        self.out_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantized = self.input(x)
        out = F.conv2d(dequantized, self._weight(), self.bias, *self.conv_args)
        if self.input_sum_weight is None:
            return out
        return undo_conv_weight_shift(out, dequantized, self, *self.conv_args[:3])


class OpenVINOWeightOnly(_OpenVINOInt8):
    """A weight-only layer (float input) with its integer weight codes: OpenVINO decompresses them in its GEMM."""

    kernel = "openvino float GEMM, int8 weight codes"

    def __init__(self, layer: QuantLayer) -> None:
        nn.Module.__init__(self)
        weight = self._store_weight(layer)
        # a weight shifted into int8 (affine 8-bit) is shifted back here: w = s * (v - m)
        shift = (
            torch.zeros_like(weight.scale)
            if weight.input_sum_weight is None
            else weight.input_sum_weight / weight.scale
        )
        self.register_buffer("weight_shift", shift.round().reshape(self.channel_shape).contiguous())
        self.is_conv = issubclass(layer.float_type, nn.Conv2d)
        if self.is_conv:
            self.conv_args = (tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight_values.float() - self.weight_shift) * self.weight_scale
        if self.is_conv:
            return F.conv2d(x, weight, self.bias, *self.conv_args)
        return F.linear(x, weight, self.bias)


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the integer weight codes the model's OpenVINO layers hold (each compiled graph copies them)."""
    return sum(m.weight_values.numel() for m in model.modules() if isinstance(m, _OpenVINOInt8))


def _output_tensors(output: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """A denoiser's output as a flat tuple of tensors, and how to rebuild it (see `_rebuild`)."""
    if isinstance(output, torch.Tensor):
        return (output,), None
    if isinstance(output, (tuple, list)):
        return tuple(output), tuple
    if is_dataclass(output):  # diffusers' BaseOutput
        names = [f.name for f in fields(output) if getattr(output, f.name) is not None]
        return tuple(getattr(output, n) for n in names), (type(output), names)
    raise DiffquantError(f"The openvino backend cannot return a {type(output).__name__} output; it takes tensors.")


def _rebuild(tensors: list[torch.Tensor], how: Any) -> Any:
    if how is None:
        return tensors[0]
    if how is tuple:
        return tuple(tensors)
    klass, names = how
    return klass(**dict(zip(names, tensors, strict=True)))


class _FlatCall(nn.Module):
    """The model called with its tensor inputs as positional arguments (what OpenVINO converts): the
    call's structure and non-tensor arguments are fixed per converted graph."""

    def __init__(self, inner: nn.Module, spec: pytree.TreeSpec, constants: list[Any]) -> None:
        super().__init__()
        self.inner, self.spec, self.constants = inner, spec, constants
        self.output_form: Any = None

    def forward(self, *tensors: torch.Tensor):
        feed = iter(tensors)
        leaves = [next(feed) if value is _TENSOR else value for value in self.constants]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        flat, self.output_form = _output_tensors(self.inner(*args, **kwargs))
        return flat


_TENSOR = object()
"""Marks a tensor leaf of a call (an OpenVINO input) among its constant leaves."""

MAX_GRAPHS = 8
"""Compiled graphs one runner keeps: a call signature that changes at every call would compile forever."""

_CONSTANT_TYPES = (type(None), bool, int, float, str)
"""Non-tensor arguments a graph may fix (they become constants of the graph and part of its signature)."""


def tensor_arguments(call: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of a keyword call in the order they are the converted graph's inputs."""
    return [v for v in pytree.tree_leaves(call) if isinstance(v, torch.Tensor)]


def tensor_argument_names(call: dict[str, Any]) -> list[str]:
    """Dotted names of those tensors (`added_cond_kwargs.resolution`): the OpenVINO IR's input names."""
    leaves = pytree.tree_flatten_with_path(call)[0]
    return [
        ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
        for path, value in leaves
        if isinstance(value, torch.Tensor)
    ]


def _describe(value: Any) -> Any:
    """A hashable stand-in for one call leaf: a tensor's dtype and shape, or the constant itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if not isinstance(value, _CONSTANT_TYPES):
        raise DiffquantError(
            f"The openvino backend takes tensors, None, numbers and strings as call arguments, not a "
            f"{type(value).__name__}; pass it as a tensor."
        )
    return ("value", type(value).__name__, value)


def _float32_if_bfloat16(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


def _causes(error: BaseException):
    """An exception and the chain of exceptions behind it."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _per_step_grids(model: nn.Module) -> list[nn.Module]:
    """The per-step grids of a model: FakeQuantize banks and per-step quantizers left in float."""
    return [
        m
        for m in model.modules()
        if getattr(m, "bank_timesteps", None) is not None
        and (m.per_step if isinstance(m, OpenVINOFakeQuantize) else getattr(m, "enabled", False))
    ]


def _step_banks(model: nn.Module) -> list[tuple[torch.Tensor, list[nn.Module]]]:
    """Per-step grids grouped by their calibrated timesteps (one group for TFMQ-DM's or DGQ's banks)."""
    banks: list[tuple[torch.Tensor, list[nn.Module]]] = []
    for grid in _per_step_grids(model):
        bank = grid.bank_timesteps
        group = next((g for t, g in banks if t.shape == bank.shape and torch.equal(t, bank)), None)
        if group is None:
            banks.append((bank, [grid]))
        else:
            group.append(grid)
    return banks


def step_graph_count(model: nn.Module) -> int:
    """How many graphs one call signature needs: one per combination of bank rows (1 without per-step grids)."""
    count = 1
    for bank, _ in _step_banks(model):
        count *= len(bank)
    return count


def _row(bank: torch.Tensor, grids: list[nn.Module]) -> int:
    """The bank row of the current call: nearest calibrated timestep to the step clock."""
    clock = next((g.clock for g in grids if g.clock is not None), None)
    if clock is None:
        step = current_step()
        if step is None:
            raise DiffquantError(
                "This model has per-step grids and needs the sampling step: sample with diffquant.sampling.sample, "
                "or wrap each denoiser call in diffquant.quant.step_context()."
            )
        clock = torch.tensor(step.timestep)
    return int(torch.argmin((bank - clock).abs()))


class OpenVINODenoiser(nn.Module):
    """Runs `inner` (the model with its int8 layers in OpenVINO's form) on OpenVINO's CPU runtime.

    The first call with a new input signature (shapes, dtypes, non-tensor arguments) converts the model
    with `openvino.convert_model` and compiles it (`precision` hint, `threads`); later calls with that
    signature run the compiled graph. Inputs and outputs are torch tensors, as from the torch model.
    """

    def __init__(
        self,
        inner: nn.Module,
        precision: str = "f32",
        threads: int | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.properties = dict(properties or {})
        """More OpenVINO CPU properties for `compile_model` (`CACHE_DIR`, `PERF_COUNT`, ...)."""
        self._compiled: dict[Any, tuple[Any, Any]] = {}  # signature -> (compiled model, output form)
        self._banks: list[tuple[torch.Tensor, list[nn.Module]]] | None = None  # per-step grids, found on first call
        self.conversion_seconds = 0.0
        self.compiled_bytes = 0
        """Process memory the compiled graphs took (RSS growth over each compile): OpenVINO's repacked
        weights and buffers, held beside the torch model's int8 codes."""

    @property
    def config(self):
        return self.inner.config

    def openvino_model(self, *args, dynamic: bool = False, **kwargs) -> Any:
        """The model converted for this call's signature, as an `openvino.Model` (write it with
        `openvino.save_model`: the int8 graph OpenVINO's runtime loads without diffquant). `dynamic`
        leaves every input dimension open (set them with `Model.reshape`); the structure and the
        non-tensor arguments of this call stay fixed."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return self._converted(spec, leaves, dynamic)[0]

    def forget_compiled(self) -> None:
        """Drop the compiled graphs (after the torch model changed, e.g. a LoRA loaded): the next call
        with each signature converts and compiles again."""
        self._compiled.clear()
        self.compiled_bytes = 0

    def executed_precisions(self) -> Counter[str]:
        """How many layers of each type ran at which precision in the compiled graphs ("FullyConnected i8")."""
        counts: Counter[str] = Counter()
        for compiled, _ in self._compiled.values():
            for op in compiled.get_runtime_model().get_ops():
                info = op.get_rt_info()
                counts[f"{info['layerType'].astype(str)} {info['runtimePrecision'].astype(str)}"] += 1
        return counts

    def compile_properties(self) -> dict[str, Any]:
        """What `compile_model` gets: threads, precision hint, no on-the-fly activation quantization."""
        return {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": self.precision,
            # OpenVINO would otherwise quantize the activations of weight-only GEMMs to int8 on the fly:
            # another model than the one calibrated (users may turn it back on in `properties`)
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
            **self.properties,
        }

    def _step_rows(self) -> tuple[int, ...]:
        """The bank row of each per-step grid group for this call, set on its FakeQuantize grids (a trace
        bakes them in; per-step quantizers left in float read the clock buffer, which a trace bakes in too)."""
        if self._banks is None:
            self._banks = _step_banks(self.inner)
        rows = []
        for bank, grids in self._banks:
            row = _row(bank, grids)
            for grid in grids:
                if isinstance(grid, OpenVINOFakeQuantize):
                    grid.row = row
            rows.append(row)
        return tuple(rows)

    def _entry(self, args, kwargs):
        # numpy has no bfloat16: such inputs go in as float32 (the graph's floats follow the precision hint)
        args, kwargs = pytree.tree_map(_float32_if_bfloat16, (args, kwargs))
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # per-step grids: one graph per step (their grids are the graph's constants, as OpenVINO's int8 needs)
        key = (spec, tuple(_describe(v) for v in leaves), self._step_rows())
        if key not in self._compiled:
            limit = MAX_GRAPHS * step_graph_count(self.inner)
            if len(self._compiled) >= limit:
                raise DiffquantError(
                    f"The openvino backend has compiled {limit} graphs for as many call signatures (shapes, "
                    "non-tensor arguments). Call it with fixed shapes, and pass values that change between calls "
                    "(a timestep) as tensors."
                )
            import openvino as ov

            started = time.perf_counter()
            model, output_form = self._converted(spec, leaves)
            before = current_rss_bytes()
            try:  # only the compiled graph is kept: OpenVINO repacks the weights into its own layout
                compiled = ov.Core().compile_model(model, "CPU", self.compile_properties())
            except Exception as error:  # noqa: BLE001 - one clear error, not OpenVINO's plugin trace
                raise DiffquantError(
                    f"OpenVINO could not compile this model ({type(error).__name__}: {str(error).splitlines()[0]}); "
                    "use --backend onednn."
                ) from error
            self._compiled[key] = (compiled, output_form)
            del model  # the converted graph shares the torch weights; the compiled one has its own
            self.compiled_bytes += max(current_rss_bytes() - before, 0)
            self.conversion_seconds += time.perf_counter() - started
        return self._compiled[key], [v for v in leaves if isinstance(v, torch.Tensor)]

    def _converted(self, spec, leaves, dynamic: bool = False) -> tuple[Any, Any]:
        import openvino as ov

        constants = [_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves]
        flat = _FlatCall(self.inner, spec, constants).eval()
        tensors = tuple(v for v in leaves if isinstance(v, torch.Tensor))
        # static shapes (one graph per signature): OpenVINO plans memory and picks kernels once
        shapes = [ov.PartialShape([-1 if dynamic else n for n in t.shape]) for t in tensors]
        try:
            with torch.no_grad():
                model = ov.convert_model(flat, example_input=tensors, input=shapes)
        except DiffquantError:
            raise
        except Exception as error:  # noqa: BLE001 - the trace's own error, if ours, is the clearer one
            cause = next((e for e in _causes(error) if isinstance(e, DiffquantError)), None)
            if cause is not None:
                raise cause from error
            raise DiffquantError(
                f"OpenVINO could not convert this model ({type(error).__name__}: {str(error).splitlines()[0]}); "
                "use --backend onednn."
            ) from error
        return model, flat.output_form

    def compiled_call(self, *args, **kwargs) -> tuple[Any, list[Any]]:
        """The compiled OpenVINO model for this call (converted and compiled if new) and its inputs as numpy
        arrays, in order: for profiling it with OpenVINO's own tools (`PERF_COUNT` in `properties`)."""
        (compiled, _), tensors = self._entry(args, kwargs)
        return compiled, [t.detach().numpy() for t in tensors]

    def forward(self, *args, **kwargs):
        (compiled, output_form), tensors = self._entry(args, kwargs)
        results = compiled([t.detach().numpy() for t in tensors])
        outputs = [torch.from_numpy(results[i]) for i in range(len(compiled.outputs))]
        return _rebuild(outputs, output_form)
