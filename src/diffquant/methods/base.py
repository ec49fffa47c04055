"""What every method config shares: bit widths, formats, layer patterns and calibration settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from diffquant.calibration import AllSteps, SkewNormalSteps, TimestepPolicy, UniformSteps
from diffquant.calibration.tdac import tdac_policy
from diffquant.errors import ConfigError
from diffquant.modules import LayerOverride, LayerPolicy
from diffquant.quant import QuantSpec
from diffquant.quant.formats import MAX_INT_BITS, parse_format
from diffquant.quant.gguf_blocks import BLOCK_SIZE, block_type
from diffquant.sampling import SamplerConfig

FLOAT_ACTIVATION_BITS = (16, 32)
CALIBRATION_POLICIES = ("uniform", "all", "ndtc", "tdac")


@dataclass
class CalibrationConfig:
    """How calibration data is recorded when `quantize` is not given a calibration set."""

    trajectories: int = 256
    """Number of full-precision sampling runs to record from."""
    policy: str = "uniform"
    """uniform (Q-Diffusion), all (every step), ndtc (PTQ4DM's skew-normal) or tdac (EDA-DM)."""
    uniform_steps: int = 25
    ndtc_mean: float = 0.4
    ndtc_std: float = 0.4
    tdac_lambda: float = 1.2
    """EDA-DM: weight of variety against density."""
    tdac_radius: float | None = None
    """EDA-DM: MSE radius of the density count; None = the median pairwise MSE of the features."""
    tdac_feature_module: str | None = None
    """EDA-DM: module whose output is the per-step feature; None = mid-block attention / middle block."""
    scheduler: str = "ddim"
    steps: int = 25
    seed: int = 1234

    def validate(self) -> None:
        if self.policy not in CALIBRATION_POLICIES:
            raise ConfigError(
                f"Unknown calibration policy '{self.policy}'. Choose one of: {', '.join(CALIBRATION_POLICIES)}."
            )
        if self.trajectories <= 0:
            raise ConfigError(f"calibration.trajectories must be positive, got {self.trajectories}.")
        self.sampler().validate()

    def timestep_policy(self, model=None) -> TimestepPolicy:
        """The selection policy; TDAC needs the full-precision `model` to measure its features."""
        if self.policy == "uniform":
            return UniformSteps(min(self.uniform_steps, self.steps))
        if self.policy == "all":
            return AllSteps()
        if self.policy == "ndtc":
            return SkewNormalSteps(self.ndtc_mean, self.ndtc_std)
        if model is None:
            raise ConfigError("The tdac calibration policy needs the full-precision model.")
        return tdac_policy(
            model, self.sampler(), self.trajectories, self.tdac_lambda, self.tdac_radius, self.tdac_feature_module
        )

    def sampler(self) -> SamplerConfig:
        return SamplerConfig(self.scheduler, self.steps)


@dataclass
class MethodConfig:
    """Fields common to all methods. Subclasses set the paper's defaults."""

    name: ClassVar[str] = "base"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named bundles of defaults (e.g. 'paper' and 'fast'); values given explicitly win."""
    needs_text: ClassVar[bool] = False
    """The method quantizes a text conditioning (MixDQ, DGQ): models without one are refused up front."""

    wbits: int = 8
    """Weight bit width (1-16)."""
    abits: int | None = 8
    """Activation bit width (1-16); None, 16 or 32 leave activations in floating point (weight-only)."""
    weight_format: str | None = None
    """Override the weight number format (e.g. 'e2m1', 'e4m3'); default int{wbits}."""
    activation_format: str | None = None
    """Override the activation number format (e.g. 'e4m3'); default int/uint{abits}."""
    weight_group_size: int | None = None
    """Group-wise weights: one scale per this many consecutive input (reduction) weights, e.g. 32/64/128
    (a layer whose reduction size it does not divide uses their gcd); None = one scale per output channel."""
    attention_bits: int | None = None
    """Quantize Q, K, V at the attention matmuls with this many bits (None: float matmuls)."""
    softmax_bits: int | None = None
    """Bits of the post-softmax probabilities when attention is quantized (None: float). On the `openvino`
    backend, 8 with symmetric Q/K/V grids is the fastest attention: probabilities x V runs on int8 too."""
    activation_symmetric: bool = False
    """Symmetric signed input grids (zero-point 0) for the layers' activations, as NNCF's performance
    preset: int8 kernels skip the zero-point compensation, at one bit less for one-sided inputs."""
    attention_symmetric: bool = False
    """Symmetric Q, K, V grids (zero-point 0) where attention is quantized, as NNCF's: one bit less for
    one-sided operands, and no shift-correction terms in the deployed graph. Affine grids run on OpenVINO's
    int8 attention kernel too (shifted exactly), at the same speed with float probabilities; with 8-bit
    probabilities the symmetric form is 1.17-1.36x faster (benchmarks/results/attention/)."""
    activation_per_step: bool = False
    """One activation parameter set per calibrated sampling step (TFMQ-DM's finite-set calibration)."""
    include: tuple[str, ...] = ("*",)
    keep_fp: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()
    batch_size: int = 64
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    preset: str = "default"
    """Which preset the defaults came from (see PRESETS)."""
    weight_grid: str | None = None
    """Put weights on a GGUF block grid (q8_0, q5_0, q4_0: group 32, ggml's scale rule) for GGUF export."""

    @classmethod
    def from_preset(cls, preset: str | None = None, **values: Any) -> MethodConfig:
        """The config of a preset ('paper', 'fast', ...) with `values` on top."""
        preset = preset or ("fast" if "fast" in cls.PRESETS else "default")
        if preset != "default" and preset not in cls.PRESETS:
            known = ", ".join(["default", *cls.PRESETS]) if cls.PRESETS else "default"
            raise ConfigError(f"Method '{cls.name}' has no preset '{preset}'. Presets: {known}.")
        merged = dict(cls.PRESETS.get(preset, {}))
        for key, value in values.items():
            if key in merged and isinstance(merged[key], dict) and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return cls.from_json({**merged, "preset": preset})

    # validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        _check_scalar_types(self)
        _check_bits("wbits", self.wbits)
        if self.abits is not None and self.abits not in FLOAT_ACTIVATION_BITS:
            _check_bits("abits", self.abits)
        for name in ("attention_bits", "softmax_bits"):
            if getattr(self, name) is not None:
                _check_bits(name, getattr(self, name))
        for name in ("weight_format", "activation_format"):
            if getattr(self, name) is not None:
                parse_format(getattr(self, name))
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")
        if self.weight_group_size is not None and (
            not isinstance(self.weight_group_size, int) or self.weight_group_size <= 0
        ):
            raise ConfigError(f"weight_group_size must be a positive integer or None, got {self.weight_group_size!r}.")
        self.calibration.validate()
        if self.weight_grid is not None and block_type(self.weight_grid).bits != self.wbits:
            raise ConfigError(
                f"weight_grid {self.weight_grid} stores {block_type(self.weight_grid).bits}-bit weights: "
                f"set wbits={block_type(self.weight_grid).bits}."
            )
        self.weight_spec()
        activation = self.activation_spec()
        if self.activation_symmetric and (activation is None or not activation.symmetric):
            why = "quantizes no activations (weight-only)" if activation is None else "sets its own activation grids"
            raise ConfigError(
                f"activation_symmetric=True does not apply here: {self.name} {why}. Drop activation_symmetric."
            )
        if self.attention_symmetric and self.attention_spec() is None:
            raise ConfigError(
                "attention_symmetric=True sets the grids of quantized attention, and this config leaves attention "
                "in float: also set attention_bits (e.g. attention_bits=8), or drop attention_symmetric."
            )

    @property
    def weight_only(self) -> bool:
        return self.abits is None or self.abits in FLOAT_ACTIVATION_BITS

    @property
    def setting(self) -> str:
        """'W4A8', 'W4A16' (weight-only) ..."""
        return f"W{self.wbits}A{16 if self.weight_only else self.abits}"

    # specs (subclasses change observers, symmetry, granularity) --------------------------------
    def weight_spec(self) -> QuantSpec:
        if self.weight_group_size is not None:
            return QuantSpec(
                self.weight_format or f"int{self.wbits}", granularity="group", group_size=self.weight_group_size
            )
        return QuantSpec(self.weight_format or f"int{self.wbits}", symmetric=True, granularity="per_channel")

    def activation_spec(self) -> QuantSpec | None:
        if self.weight_only:
            return None
        default = f"int{self.abits}" if self.activation_symmetric else f"uint{self.abits}"
        return QuantSpec(
            self.activation_format or default, symmetric=self.activation_symmetric, per_step=self.activation_per_step
        )

    def attention_spec(self) -> QuantSpec | None:
        if self.attention_bits is None or self.weight_only:
            return None
        return QuantSpec(
            f"int{self.attention_bits}", symmetric=self.attention_symmetric, per_step=self.activation_per_step
        )

    def softmax_spec(self) -> QuantSpec | None:
        if self.softmax_bits is None or self.weight_only:
            return None
        # probabilities lie in [0, 1]: unsigned with zero-point 0
        return QuantSpec(f"uint{self.softmax_bits}", symmetric=True, per_step=self.activation_per_step)

    def layer_policy(self, extra_overrides: tuple[LayerOverride, ...] = ()) -> LayerPolicy:
        weight = self.weight_spec()
        if self.weight_grid is not None:  # the method's observers yield to ggml's scale rule
            kind = block_type(self.weight_grid)
            weight = weight.replace(
                format=f"int{kind.bits}", symmetric=True, granularity="group", group_size=BLOCK_SIZE, gguf=kind.name
            )
        return LayerPolicy(
            weight=weight,
            activation=self.activation_spec(),
            attention=self.attention_spec(),
            softmax=self.softmax_spec(),
            include=tuple(self.include),
            keep_fp=tuple(self.keep_fp),
            overrides=tuple(self.overrides) + tuple(extra_overrides),
        )

    # plain data -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        payload = {"method": self.name, **asdict(self)}
        if payload.get("weight_grid") is None:  # unset: records and cache keys stay as before the option
            payload.pop("weight_grid", None)
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> MethodConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(payload) - set(known) - {"method"}
        if unknown:
            raise ConfigError(f"Method '{cls.name}' has no option(s) {', '.join(sorted(unknown))}.")
        values = {k: v for k, v in payload.items() if k in known}
        for key, value in list(values.items()):  # nested dataclass configs given as dicts
            default = known[key].default_factory() if callable(known[key].default_factory) else None
            if isinstance(value, dict) and default is not None and hasattr(default, "__dataclass_fields__"):
                extra = set(value) - set(default.__dataclass_fields__)
                if extra:
                    raise ConfigError(f"{key} has no option(s) {', '.join(sorted(extra))}.")
                values[key] = replace(default, **value)
        if "overrides" in values and values["overrides"] and isinstance(values["overrides"][0], dict):
            values["overrides"] = tuple(LayerOverride(**o) for o in values["overrides"])
        for key in ("include", "keep_fp", "blocks"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> MethodConfig:
        return replace(self, **changes)

    def __str__(self) -> str:
        return json.dumps(self.to_json())


def _check_bits(name: str, bits: Any) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_INT_BITS:
        hint = " (use 16 or 32, or None, for float activations)" if name == "abits" else ""
        raise ConfigError(f"{name} must be an integer between 1 and {MAX_INT_BITS}, got {bits!r}{hint}.")


SCALAR_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float)}
"""Option annotations checked at validation (`x | None` allows None), so `--option gptq=3` fails clearly."""


def _check_scalar_types(config: MethodConfig) -> None:
    for item in fields(config):
        annotation = str(item.type)
        allowed = SCALAR_TYPES.get(annotation.removesuffix(" | None"))
        value = getattr(config, item.name)
        if allowed is None or (value is None and annotation.endswith(" | None")):
            continue
        if isinstance(value, bool) and annotation.split()[0] != "bool" or not isinstance(value, allowed):
            raise ConfigError(
                f"{config.name}: option '{item.name}' must be {annotation}, got {value!r}. "
                f"Pass a JSON value, e.g. --option {item.name}="
                + ("true" if annotation.startswith("bool") else "1")
                + "."
            )
