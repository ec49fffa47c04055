"""`Quantizer`: the module every quantized layer uses for its weights, inputs and matmul operands.

A quantizer holds a `QuantSpec` (plain data: format, granularity, observer, dynamic/static,
per-step bank, learnable step size) and its calibrated parameters. It has three modes:

* observing - values pass through unchanged while the observer(s) record ranges;
* quantizing - values are fake-quantized with the calibrated scale and zero-point;
* disabled - values pass through unchanged.

With `per_step=True` it keeps one parameter set per calibrated sampling step (a bank keyed by the
timestep value) and picks the set of the current step from `diffquant.quant.context`; a sampler
with a different step count uses the nearest calibrated timestep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant.codes import to_codes
from diffquant.quant.context import current_step
from diffquant.quant.formats import BinaryFormat, FloatFormat, IntFormat, NumberFormat, ScaledFloatFormat, parse_format
from diffquant.quant.functional import fake_quantize, params_from_range, scale_gradient
from diffquant.quant.gguf_blocks import block_grid_params, check_gguf_spec, gguf_rtn_codes, gguf_rtn_values
from diffquant.quant.granularity import Granularity, group_view, ungroup
from diffquant.quant.observers import OBSERVERS, Observer, make_observer
from diffquant.quant.range_groups import grouped_ranges


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Plain data: serialisable to JSON and back."""

    format: str = "int8"
    """intN / uintN (N = 1..16), an ExMy float (e4m3, e5m2, e3m2, e2m3, e2m1, e3m0) or binary."""
    symmetric: bool = True
    """Integer grids: zero-point 0 (True) or an affine zero-point (False)."""
    granularity: str = "per_tensor"
    """per_tensor, per_channel, per_token, group (weights) or token_group (dynamic activations)."""
    axis: int = 0
    """Channel axis for per_channel."""
    group_size: int | None = None
    """Elements per scale for group granularity."""
    observer: str = "minmax"
    """minmax, ema, percentile or lp (Q-Diffusion's MSE shrink-grid search)."""
    dynamic: bool = False
    """Compute the range from every input at run time (e.g. per-token activations); no calibration."""
    per_step: bool = False
    """One parameter set per sampling step, chosen from the step context (TFMQ-DM's FSC)."""
    learnable: bool = False
    """Make the step size a trainable parameter (LSQ) after calibration."""
    percentile: float = 99.99
    lp_norm: float = 2.4
    grid: int = 80
    ema_momentum: float = 0.95
    gguf: str | None = None
    """Weights on a GGUF block grid (q8_0, q5_0, q4_0): group 32, ggml's scale rule and rounding."""
    fp_leading_tokens: int = 0
    """Activations of shape (batch, tokens, channels): this many leading tokens pass through in full
    precision and stay out of the range (the BOS token of a text embedding: MixDQ, DGQ)."""
    range_groups: int | None = None
    """Static per_channel ranges shared by k-means groups of this many (DGQ's distribution-aware groups)."""

    def __post_init__(self) -> None:
        fmt = self.number_format  # validates the name
        if self.gguf is not None:
            check_gguf_spec(self.format, self.granularity, self.group_size, self.gguf)
        Granularity(self.granularity, self.axis, self.group_size)
        if self.observer not in OBSERVERS:
            raise ConfigError(f"Unknown observer '{self.observer}'. Choose one of: {', '.join(OBSERVERS)}.")
        if isinstance(fmt, IntFormat) and fmt.bits == 1 and self.symmetric and fmt.signed:
            raise ConfigError(
                "A 1-bit signed symmetric grid has no positive level: use symmetric=False (codes {0, 1}) "
                "or format='binary' (+-scale)."
            )
        if self.fp_leading_tokens < 0:
            raise ConfigError(f"fp_leading_tokens must be >= 0, got {self.fp_leading_tokens}.")
        if self.range_groups is not None and (
            self.range_groups <= 0 or self.dynamic or self.granularity != "per_channel"
        ):
            raise ConfigError(
                "range_groups (DGQ) clusters the static ranges of a per_channel quantizer: use a positive "
                "count with granularity='per_channel' and dynamic=False."
            )
        if self.dynamic and self.per_step:
            raise ConfigError("A dynamic quantizer computes its range per call; it cannot also be per_step.")
        if self.granularity == "token_group" and not self.dynamic:
            raise ConfigError("token_group scales depend on the tokens of each call: set dynamic=True.")
        if isinstance(fmt, ScaledFloatFormat) and (
            self.granularity not in ("group", "token_group") or self.group_size != fmt.block
        ):
            raise ConfigError(
                f"{fmt.name} shares one scale per {fmt.block} values: use granularity='group' (weights) or "
                f"'token_group' (dynamic activations) with group_size={fmt.block}."
            )

    @property
    def number_format(self) -> NumberFormat:
        return parse_format(self.format)

    @property
    def bits(self) -> int:
        return self.number_format.storage_bits

    @property
    def grouping(self) -> Granularity:
        return Granularity(self.granularity, self.axis, self.group_size)

    def replace(self, **changes: Any) -> QuantSpec:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        for name, unset in (("gguf", None), ("fp_leading_tokens", 0), ("range_groups", None)):
            if payload[name] == unset:  # unset: saved structures stay as before the option
                del payload[name]
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> QuantSpec:
        return cls(**{k: v for k, v in payload.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        parts = [self.format]
        if isinstance(self.number_format, IntFormat):
            parts.append("sym" if self.symmetric else "asym")
        parts.append(self.grouping.describe())
        if self.dynamic:
            parts.append("dynamic")
        if self.range_groups is not None:
            parts.append(f"{self.range_groups} range groups")
        if self.fp_leading_tokens:
            parts.append(f"{self.fp_leading_tokens} fp leading token(s)")
        if self.per_step:
            parts.append("per-step")
        return " ".join(parts)


class Quantizer(nn.Module):
    """Fake quantization of one tensor role (weight, input, matmul operand)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fmt = spec.number_format
        self.grouping = spec.grouping
        self.enabled = True
        self.observing = False
        self.drop_prob = 0.0  # QDrop: share of elements kept in full precision while reconstructing
        self._observers: dict[int, Observer] = {}
        self._observed_timesteps: dict[int, float] = {}
        self.register_buffer("scale", None)
        # while step sizes are learned (LSQ) they live in log space, so they stay positive by construction
        self.register_parameter("log_scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("bank_timesteps", None)
        self.register_buffer("clock", None, persistent=False)

    # --- calibration ---------------------------------------------------------------------------
    def start_observing(self) -> None:
        self.observing = True
        self._observers.clear()
        self._observed_timesteps.clear()

    def _observer_for_step(self) -> Observer:
        key = 0
        if self.spec.per_step:
            step = current_step()
            if step is None:
                raise DiffquantError(
                    "A per-step quantizer is being calibrated outside a sampling step: feed calibration "
                    "batches inside diffquant.quant.step_context(index, timestep, num_steps)."
                )
            key = step.index
            self._observed_timesteps[key] = step.timestep
        if key not in self._observers:
            options: dict[str, float] = {}
            if self.spec.observer == "percentile":
                options["percentile"] = self.spec.percentile
            elif self.spec.observer == "lp":
                options = {"p": self.spec.lp_norm, "grid": self.spec.grid}
            elif self.spec.observer == "ema":
                options["momentum"] = self.spec.ema_momentum
            self._observers[key] = make_observer(self.spec.observer, self.fmt, self.spec.symmetric, **options)
        return self._observers[key]

    def finish_observing(self) -> None:
        """Turn the observed ranges into scale/zero-point (one set, or one per observed step)."""
        self.observing = False
        if self.spec.dynamic:
            return
        if not self._observers:
            raise DiffquantError(
                "A quantizer saw no data during calibration: the layer is never called on the calibration "
                "inputs. Exclude it in the layer policy or check the calibration data."
            )
        keys = sorted(self._observers)
        params = [params_from_range(*self._observed_range(k), self.fmt, self.spec.symmetric) for k in keys]
        scales = torch.stack([p[0] for p in params])
        zero_points = torch.stack([p[1] for p in params])
        if self.spec.per_step:
            self.bank_timesteps = torch.tensor([self._observed_timesteps[k] for k in keys], dtype=torch.float32)
            self._set_params(scales, zero_points)
        else:
            self._set_params(scales[0], zero_points[0])
        self._observers.clear()

    def _observed_range(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self._observers[key].range()
        if self.spec.range_groups is not None:
            return grouped_ranges(low, high, self.spec.range_groups)
        return low, high

    def _set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self._assign_scale(scale.clone())
        self.zero_point = zero_point.clone()

    def _assign_scale(self, scale: torch.Tensor) -> None:
        """Store the step size: as a trainable log step size when learnable (LSQ), else as a buffer."""
        self._parameters["log_scale"] = None
        self._buffers["scale"] = None
        scale = scale.detach()
        if self.spec.learnable:
            check_positive_scale(scale, "the step size to learn")
            self.log_scale = nn.Parameter(scale.log())
        else:
            self.scale = scale

    def set_learnable(self, learnable: bool) -> None:
        """Switch LSQ step-size learning on or off, keeping the current values."""
        current = self.step_size()
        self.spec = self.spec.replace(learnable=learnable)
        if current is not None:
            self._assign_scale(current.detach().clone())

    def step_size(self) -> torch.Tensor | None:
        """The current step size(s): exp of the learned log step size, or the calibrated buffer."""
        if self.log_scale is not None:
            return self.log_scale.exp()
        return self.scale

    def trainable_step_sizes(self) -> list[nn.Parameter]:
        """The parameters an optimiser updates while step sizes are learned."""
        return [self.log_scale] if self.log_scale is not None else []

    def calibrate_static(self, tensor: torch.Tensor) -> None:
        """Calibrate from one tensor (weights): observe it once and fix the parameters."""
        if isinstance(self.fmt, BinaryFormat):
            mean_magnitude = group_view(tensor.detach(), self.grouping).abs().mean(1)  # XNOR-Net scaling
            self._set_params(mean_magnitude.clamp_min(1e-8), torch.zeros_like(mean_magnitude))
            return
        if self.spec.gguf is not None:  # the GGUF rule fixes the scale; observers do not apply
            self._set_params(*block_grid_params(group_view(tensor.detach(), self.grouping), self.spec.gguf))
            return
        if self.spec.per_step:
            raise ConfigError("Weights are the same at every step: a per_step weight quantizer makes no sense.")
        self.start_observing()
        self._observer_for_step().update(group_view(tensor.detach(), self.grouping))
        self.finish_observing()

    def regridded(self, spec: QuantSpec) -> Quantizer:
        """A quantizer with `spec` (another integer width) over the range this one was calibrated to,
        per-step banks included: mixed-precision probes change widths without re-observing data."""
        quantizer = Quantizer(spec)
        scale = self.step_size()
        if self.spec.dynamic or scale is None:  # nothing calibrated to carry over
            return quantizer
        if not isinstance(self.fmt, IntFormat) or not isinstance(quantizer.fmt, IntFormat):
            raise ConfigError(f"Only integer grids change width over a range; got {self.fmt} -> {quantizer.fmt}.")
        scale = scale.detach()
        high = (self.fmt.qmax - self.zero_point) * scale
        low = -high if self.spec.symmetric else (self.fmt.qmin - self.zero_point) * scale
        quantizer._set_params(*params_from_range(low, high, quantizer.fmt, spec.symmetric))
        if self.bank_timesteps is not None:
            quantizer.bank_timesteps = self.bank_timesteps.clone()
        return quantizer

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.step_size() is not None

    # --- parameters for the current call -------------------------------------------------------
    def step_row(self) -> int | torch.Tensor:
        """Row of the per-step bank for the current sampling step (nearest calibrated timestep).

        A deployed model attaches a shared `clock` tensor; the row is then computed with tensor ops so
        a compiled graph does not recompile at every step.
        """
        if self.clock is not None:
            return torch.argmin((self.bank_timesteps - self.clock).abs())
        step = current_step()
        if step is None:
            raise DiffquantError(
                "This model has per-step quantizers and needs the sampling step: sample with "
                "diffquant.sampling.sample, or wrap each denoiser call in diffquant.quant.step_context()."
            )
        return int(torch.argmin((self.bank_timesteps - step.timestep).abs()))

    def attach_clock(self, clock: torch.Tensor | None) -> None:
        """Read the current timestep from `clock` (a shared 0-d tensor) instead of the step context."""
        if self.spec.per_step:
            self.clock = clock

    def current_params(self, view: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) shaped (G, 1) for the grouped view."""
        if self.spec.dynamic:
            assert view is not None
            detached = view.detach()
            scale, zero_point = params_from_range(detached.amin(1), detached.amax(1), self.fmt, self.spec.symmetric)
        else:
            if self.log_scale is not None:
                # LSQ (Esser et al. 2020): gradient of the step size scaled by 1 / sqrt(N * Q_P)
                elements = view.shape[1] if view is not None else 1
                factor = 1.0 / math.sqrt(elements * _positive_levels(self.fmt))
                scale = scale_gradient(self.log_scale, factor).exp()
            elif self.scale is None:
                raise DiffquantError("Quantizer used before calibration: run diffquant.quantize() first.")
            else:
                scale = self.scale
            zero_point = self.zero_point
            if self.spec.per_step:
                row = self.step_row()
                scale, zero_point = scale[row], zero_point[row]
        return scale.reshape(-1, 1), zero_point.reshape(-1, 1)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.dtype in (torch.bfloat16, torch.float16):  # a model deployed in half precision: same float32 grid
            return self.forward(x.float()).to(x.dtype)
        kept = self.spec.fp_leading_tokens
        if kept and x.ndim == 3:  # leading tokens bypass the quantizer and its range
            return torch.cat([x[:, :kept], self._quantize(x[:, kept:])], 1)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            if not self.spec.dynamic:
                self._observer_for_step().update(group_view(x, self.grouping))
            return x
        view = group_view(x, self.grouping)
        if self.spec.gguf is not None:  # ggml's round-to-nearest, exactly as the file will hold it
            return ungroup(gguf_rtn_values(view, self.spec.gguf), x.shape, self.grouping)
        scale, zero_point = self.current_params(view)
        if self.grouping.kind == "per_tensor":  # skip the reshape round trip on the hot path
            quantized = fake_quantize(x, scale.reshape(()), zero_point.reshape(()), self.fmt)
        else:
            quantized = ungroup(fake_quantize(view, scale, zero_point, self.fmt), x.shape, self.grouping)
        if self.drop_prob > 0:  # QDrop (Wei et al. 2022): randomly keep full-precision values
            quantized = torch.where(torch.rand_like(x) < self.drop_prob, x, quantized)
        return quantized

    def rtn_codes(self, view: torch.Tensor) -> torch.Tensor:
        """Unsigned round-to-nearest codes of a grouped view (GGUF grids round as ggml does)."""
        if self.spec.gguf is not None:
            return gguf_rtn_codes(view, self.spec.gguf)
        scale, zero_point = self.current_params(view)
        return to_codes(view, scale, zero_point, self.fmt)

    # --- persistence: parameters are created lazily, so loading must size them ------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        for name in ("zero_point", "bank_timesteps"):
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].clone())
        if prefix + "scale" in state_dict:
            self._assign_scale(state_dict[prefix + "scale"].clone())
        elif prefix + "log_scale" in state_dict:
            self._assign_scale(state_dict[prefix + "log_scale"].exp())
        elif strict and not self.spec.dynamic and self.step_size() is None:
            missing_keys.append(prefix + "scale")

    def extra_repr(self) -> str:
        state = "disabled" if not self.enabled else ("observing" if self.observing else "quantizing")
        return f"{self.spec.describe()}, {state}"


def _positive_levels(fmt: NumberFormat) -> float:
    """LSQ's Q_P: the largest positive code of the grid."""
    if isinstance(fmt, IntFormat):
        return float(max(fmt.qmax, 1))
    return float(fmt.max_value) if isinstance(fmt, FloatFormat) else 1.0


def check_positive_scale(scale: torch.Tensor, what: str) -> None:
    """Raise when a step size is non-finite or not strictly positive (it would corrupt every output)."""
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        raise DiffquantError(
            f"{what} has {int(bad.sum())} non-finite or non-positive step size(s) "
            f"(e.g. {scale[bad].flatten()[0]:.3g}); the quantized outputs would be wrong."
        )


def invalid_step_sizes(model: nn.Module) -> list[str]:
    """Names of the quantizers in `model` whose step sizes are non-finite or not strictly positive."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            scale = module.step_size()
            if scale is None:
                continue
            bad = ~torch.isfinite(scale)
            if module.spec.gguf is None:  # ggml's block rule (d = max / -8) gives signed and zero scales
                bad |= scale <= 0
            if bool(bad.any()):
                names.append(name)
    return names


def require_valid_step_sizes(model: nn.Module, where: str) -> None:
    """One clear error naming the quantizers whose step sizes are non-finite or non-positive."""
    bad = invalid_step_sizes(model)
    if bad:
        raise DiffquantError(
            f"{where}: {len(bad)} quantizer(s) have a non-finite or non-positive step size ({', '.join(bad[:3])}); "
            "such a model computes wrong outputs. Re-quantize (a lower step-size learning rate avoids it)."
        )


def is_float_format(spec: QuantSpec) -> bool:
    return isinstance(spec.number_format, FloatFormat | ScaledFloatFormat)
