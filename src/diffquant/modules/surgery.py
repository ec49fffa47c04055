"""Model surgery: swap layers for their quantized counterparts and drive all quantizers at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from diffquant.errors import ConfigError
from diffquant.modules.attention import QuantAttnProcessor, wrap_processor
from diffquant.modules.kinds import kind_for_plan, plan_fields_from_entry, quantized_modules
from diffquant.modules.layers import QuantLayer, wrap_layer
from diffquant.modules.policy import AttentionPlan, LayerPlan
from diffquant.quant import Quantizer, QuantSpec


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def apply_plans(model: nn.Module, layers: dict[str, LayerPlan], attention: dict[str, AttentionPlan]) -> None:
    """Replace every planned layer in place and give planned attention modules a quantized processor."""
    for name, plan in layers.items():
        parent, child = _parent(model, name)
        original = getattr(parent, child)
        kind = kind_for_plan(plan)
        if kind is None and plan.kind is not None:
            raise ConfigError(f"Layer '{name}' asks for layer kind '{plan.kind}', which is not registered.")
        if kind is None:
            setattr(parent, child, wrap_layer(original, plan.weight, plan.input))
        else:
            setattr(parent, child, kind.from_plan(original, plan))
    for name, plan in attention.items():
        module = model.get_submodule(name)  # wrap the module's own processor: joint attention keeps working
        module.set_processor(wrap_processor(module.processor, plan.operands, plan.probs, plan.fp_text_bos))


def export_plans(model: nn.Module) -> dict:
    """The quantized structure of `model` as plain data, enough to rebuild it on a fresh copy."""

    def plan(module: nn.Module) -> dict:
        layer = module.plan_layer()  # every entry carries "split" (0 unless the kind sets it): format 1
        return {
            "weight": layer.weight_quantizer.spec.to_json() if layer.weight_quantizer else None,
            "input": layer.input_quantizer.spec.to_json() if layer.input_quantizer else None,
            "split": 0,
            **module.plan_fields(),
        }

    layers = {name: plan(module) for name, module in quantized_modules(model) if module.plan_layer() is not None}
    attention = {
        name.removesuffix(".processor"): {
            "operands": processor.query_quantizer.spec.to_json() if processor.query_quantizer else None,
            "probs": processor.probs_quantizer.spec.to_json() if processor.probs_quantizer else None,
            **({"fp_text_bos": True} if processor.fp_text_bos else {}),
        }
        for name, processor in attention_processors(model)
    }
    return {"layers": layers, "attention": attention}


def import_plans(model: nn.Module, structure: dict) -> None:
    """Rebuild the structure written by `export_plans` on a full-precision copy of the model."""
    spec = lambda value: QuantSpec.from_json(value) if value else None  # noqa: E731
    layers = {
        name: LayerPlan(spec(p["weight"]), spec(p["input"]), **plan_fields_from_entry(p))
        for name, p in structure["layers"].items()
    }
    attention = {
        name: AttentionPlan(spec(p["operands"]), spec(p["probs"]), p.get("fp_text_bos", False))
        for name, p in structure["attention"].items()
    }
    apply_plans(model, layers, attention)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def attention_processors(model: nn.Module) -> Iterator[tuple[str, QuantAttnProcessor]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantAttnProcessor):
            yield name, module


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer that sees activations: layer inputs and attention matmul operands."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and not name.endswith("weight_quantizer"):
            yield name, module


@contextmanager
def activations_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily run with activation quantization off (e.g. before ranges are calibrated)."""
    previous = {name: quantizer.enabled for name, quantizer in activation_quantizers(model)}
    set_activation_quantization(model, False)
    try:
        yield
    finally:
        for name, quantizer in activation_quantizers(model):
            quantizer.enabled = previous.get(name, True)


def set_activation_quantization(model: nn.Module, enabled: bool) -> None:
    for _, quantizer in activation_quantizers(model):
        quantizer.enabled = enabled


def start_observing(model: nn.Module) -> None:
    for _, quantizer in activation_quantizers(model):
        if not quantizer.spec.dynamic:
            quantizer.start_observing()


def finish_observing(model: nn.Module) -> None:
    for _, quantizer in activation_quantizers(model):
        if quantizer.observing:
            quantizer.finish_observing()


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quant_layers(model)) or any(True for _ in attention_processors(model))
