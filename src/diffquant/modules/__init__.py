"""Quantized modules and model surgery by name pattern."""

from diffquant.modules import codebook  # noqa: F401  (registers its layer kind)
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.modules.kinds import KINDS, LayerKind, quantized_modules, register_kind
from diffquant.modules.layers import QuantConv2d, QuantLayer, QuantLinear, wrap_layer
from diffquant.modules.lowrank import LowRankQuantLayer
from diffquant.modules.policy import AttentionPlan, LayerOverride, LayerPlan, LayerPolicy, resolve_policy
from diffquant.modules.surgery import (
    activation_quantizers,
    activations_disabled,
    apply_plans,
    attention_processors,
    finish_observing,
    is_quantized,
    quant_layers,
    set_activation_quantization,
    start_observing,
)

__all__ = [
    "KINDS",
    "AttentionPlan",
    "LayerKind",
    "LayerOverride",
    "LayerPlan",
    "LayerPolicy",
    "LowRankQuantLayer",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "activation_quantizers",
    "activations_disabled",
    "apply_plans",
    "attention_processors",
    "finish_observing",
    "is_quantized",
    "quant_layers",
    "quantized_modules",
    "register_kind",
    "resolve_policy",
    "set_activation_quantization",
    "start_observing",
    "wrap_layer",
]
