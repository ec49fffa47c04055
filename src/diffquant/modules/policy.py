"""Layer policy: which modules are quantized, with which specs, chosen by module-name patterns.

Patterns are shell-style globs on dotted module names (`conv_in`, `*.time_emb_proj`,
`down_blocks.1.*`) or regular expressions prefixed with `re:`. A pattern that matches no module is an
error naming the pattern and the closest module names; a silent no-op would leave a model in full
precision while the user believes it is quantized.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from diffquant.errors import ConfigError
from diffquant.quant import QuantSpec
from diffquant.quant.formats import ScaledFloatFormat

WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerOverride:
    """Per-pattern changes to the default specs."""

    pattern: str
    weight_bits: int | None = None
    activation_bits: int | None = None
    quantize_weight: bool | None = None
    quantize_input: bool | None = None


@dataclass(frozen=True)
class LayerPlan:
    """What one weight layer gets; `split` > 0 splits a concatenated input there (Q-Diffusion);
    `lowrank` (e.g. {"rank": 32, "rotate": False}) makes it a smoothed low-rank layer (SVDQuant);
    `kind` names any other registered layer kind (modules/kinds.py), built with `options`."""

    weight: QuantSpec | None
    input: QuantSpec | None
    split: int = 0
    lowrank: dict | None = None
    kind: str | None = None
    options: dict | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """What one attention module's matmuls get; `fp_text_bos` keeps the text BOS column of the
    probabilities in float (DGQ)."""

    operands: QuantSpec | None
    probs: QuantSpec | None
    fp_text_bos: bool = False


@dataclass
class LayerPolicy:
    """Default specs plus name patterns. Plain data (see `to_json`)."""

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", granularity="per_channel"))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8"))
    attention: QuantSpec | None = None
    """Spec of Q, K and V where they enter the QK^T and PV matmuls (None: matmuls stay in float)."""
    softmax: QuantSpec | None = None
    """Spec of the post-softmax probabilities (None: float)."""
    include: tuple[str, ...] = ("*",)
    keep_fp: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LayerPolicy:
        spec = lambda value: QuantSpec.from_json(value) if value else None  # noqa: E731
        return cls(
            weight=spec(payload.get("weight")),
            activation=spec(payload.get("activation")),
            attention=spec(payload.get("attention")),
            softmax=spec(payload.get("softmax")),
            include=tuple(payload.get("include", ("*",))),
            keep_fp=tuple(payload.get("keep_fp", ())),
            overrides=tuple(LayerOverride(**o) for o in payload.get("overrides", ())),
        )


def pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_pattern(pattern: str, names: list[str], where: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as error:
            raise ConfigError(
                f"Layer pattern '{pattern}' ({where}) is not a valid regular expression: {error}."
            ) from None
    if any(pattern_matches(pattern, name) for name in names):
        return
    close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.3) or names[:5]
    raise ConfigError(
        f"Layer pattern '{pattern}' ({where}) matches no quantizable module. Close module names: "
        f"{', '.join(close)}. Patterns are globs on dotted names (e.g. 'down_blocks.*.resnets.*.conv1') "
        "or 're:<regex>'."
    )


def _with_bits(spec: QuantSpec | None, bits: int | None) -> QuantSpec | None:
    if spec is None or bits is None:
        return spec
    if spec.gguf is not None:  # another bit width on a GGUF grid is another GGUF type
        return replace(spec, format=f"int{bits}", gguf=f"q{bits}_0")
    fmt = spec.number_format
    signed = getattr(fmt, "signed", True)
    return replace(spec, format=f"{'int' if signed else 'uint'}{bits}")


def _row_length(model: nn.Module, name: str) -> int:
    weight = model.get_submodule(name).weight
    return weight[0].numel()


def fit_groups(spec: QuantSpec | None, size: int, name: str) -> QuantSpec | None:
    """A group spec whose group size divides `size` (the layer's reduction or channel count): one group
    per row when `size` is smaller, else their gcd (block-scaled floats have a fixed block and raise)."""
    if spec is None or spec.granularity not in ("group", "token_group") or size % spec.group_size == 0:
        return spec
    if isinstance(spec.number_format, ScaledFloatFormat):
        raise ConfigError(
            f"Layer '{name}' has {size} values per row, not a multiple of {spec.format}'s block of "
            f"{spec.group_size}: keep it in full precision (keep_fp) or use an integer format."
        )
    return replace(spec, group_size=size if size < spec.group_size else math.gcd(size, spec.group_size))


def check_patterns(model: nn.Module, policy: LayerPolicy) -> tuple[list[str], list[str]]:
    """Check that every pattern of `policy` matches a layer of `model` (one clear error otherwise);
    returns the names of the weight layers and of the softmax-attention modules."""
    weight_layers = [n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES) and n]
    attention_modules = [
        n
        for n, m in model.named_modules()
        # linear attention (Sana's ReLU kernel) has no softmax(QK^T)V matmuls to quantize
        if isinstance(m, (Attention, AttentionModuleMixin)) and "LinearAttn" not in type(m.processor).__name__
    ]
    names = weight_layers + attention_modules
    if not weight_layers:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers to quantize.")
    for pattern in policy.include:
        _check_pattern(pattern, names, "include")
    for pattern in policy.keep_fp:
        _check_pattern(pattern, names, "keep_fp")
    for override in policy.overrides:
        _check_pattern(override.pattern, names, "overrides")
    return weight_layers, attention_modules


def resolve_policy(
    model: nn.Module, policy: LayerPolicy, splits: dict[str, int] | None = None
) -> tuple[dict[str, LayerPlan], dict[str, AttentionPlan]]:
    """Apply the patterns to `model`'s module names; every pattern must match something.

    `splits` maps conv names to the channel where their concatenated input splits (split shortcut).
    """
    weight_layers, attention_modules = check_patterns(model, policy)

    def selected(name: str) -> bool:
        # keep_fp on an attention module also keeps its projections: match prefixes as well
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        included = any(pattern_matches(p, name) for p in policy.include)
        kept = any(pattern_matches(p, prefix) for p in policy.keep_fp for prefix in prefixes)
        return included and not kept

    layer_plans: dict[str, LayerPlan] = {}
    for name in weight_layers:
        if not selected(name):
            continue
        weight, activation = policy.weight, policy.activation
        for override in policy.overrides:
            if pattern_matches(override.pattern, name):
                weight = _with_bits(weight, override.weight_bits)
                activation = _with_bits(activation, override.activation_bits)
                if override.quantize_weight is False:
                    weight = None
                if override.quantize_input is False:
                    activation = None
        if weight is not None and weight.gguf is not None and _row_length(model, name) % weight.group_size:
            weight = None  # a row GGUF cannot cut into 32-blocks stays in float (as in ggml's converters)
        if weight is not None or activation is not None:
            module = model.get_submodule(name)
            split = (splits or {}).get(name, 0)
            reduction = module.weight[0].numel() if not split else module.weight[0, :split].numel()
            if split and reduction != module.weight[0, split:].numel():
                reduction = math.gcd(reduction, module.weight[0, split:].numel())
            weight = fit_groups(weight, reduction, name)
            channels = module.weight.shape[1]
            activation = fit_groups(activation, math.gcd(split, channels - split) if split else channels, name)
            layer_plans[name] = LayerPlan(weight, activation, split)

    attention_plans: dict[str, AttentionPlan] = {}
    if policy.attention is not None or policy.softmax is not None:
        for name in attention_modules:
            if selected(name):
                attention_plans[name] = AttentionPlan(policy.attention, policy.softmax)
    return layer_plans, attention_plans
