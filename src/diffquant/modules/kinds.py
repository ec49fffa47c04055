"""The registry of quantized layer kinds (optimum-quanto's `register_qmodule` table, our own way).

A layer kind is a module class that stands in for one float `nn.Linear`/`nn.Conv2d` of the model. It
is registered once, in its own file, with `@register_kind`, and owns everything other files would
otherwise special-case by type:

* building: `wants(plan)` says whether a `LayerPlan` asks for this kind, `from_plan(original, plan)`
  builds it (plans nobody wants become plain `QuantLinear`/`QuantConv2d`);
* plan serialisation: `plan_fields()` is what a saved structure records beside the weight and input
  specs, `read_plan_fields(entry)` turns such an entry back into `LayerPlan` fields;
* its quantized sub-layers: `quantized_parts()` names the `QuantLayer`s inside it (surgery, unit
  discovery and reconstruction treat the kind as one layer made of these parts; backends convert the
  parts), `plan_layer()` is the part whose specs the plan records;
* runtime export: `float_paths()` names what the kind computes itself, in float, around the parts a
  backend converted (counted in the export's kernel report);
* formats that know no kinds (GGUF, diffusers-quanto): `float_type`, `weight_pieces()` (quantized
  layers whose weights side by side along the input axis are the float weight), `joined_weight()` and
  `joined_bias()`.

This file imports nothing from the kinds themselves, so every kind file can import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from diffquant.errors import ConfigError, DiffquantError

# Annotations below: a "part" is a `QuantLayer` (modules/layers.py), a plan a `LayerPlan` (modules/policy.py);
# both files import this one, so their types are written as nn.Module / Any here.

KINDS: dict[str, type[nn.Module]] = {}
"""Kind name -> module class, filled by `register_kind` in each kind's own file."""


class LayerKind:
    """The protocol of a registered layer kind, with defaults for a kind built from `LayerPlan.kind`.

    Mix it into an `nn.Module` subclass; override what the kind does differently.
    """

    kind: ClassVar[str]
    float_type: type[nn.Module] = nn.Linear
    """The float module this kind replaces (decides how formats without kinds lay its weight out)."""

    # building --------------------------------------------------------------------------------------
    @classmethod
    def wants(cls, plan: Any) -> bool:
        return plan.kind == cls.kind

    @classmethod
    def from_plan(cls, original: nn.Module, plan: Any) -> nn.Module:
        return cls(original, plan.weight, plan.input, **(plan.options or {}))

    # plan serialisation ----------------------------------------------------------------------------
    def plan_options(self) -> dict:
        """Keyword arguments of `from_plan` beyond the specs (JSON values)."""
        return {}

    def plan_fields(self) -> dict:
        return {"kind": self.kind, "options": self.plan_options()}

    @classmethod
    def read_plan_fields(cls, entry: dict) -> dict:
        return {"kind": cls.kind, "options": entry.get("options")} if entry.get("kind") == cls.kind else {}

    # quantized sub-layers --------------------------------------------------------------------------
    def quantized_parts(self) -> dict[str, nn.Module]:
        """The `QuantLayer`s inside this kind, by name relative to it ('' for the kind itself)."""
        return {"": self}

    def plan_layer(self) -> nn.Module | None:
        """The part whose weight and input specs the saved plan records (None: the kind is not saved by plan)."""
        return next(iter(self.quantized_parts().values()), None)

    # reconstruction --------------------------------------------------------------------------------
    def trainable_float_parameters(self) -> list[nn.Parameter]:
        """Float parameters beside the quantized parts that reconstruction may train with the rounding
        (a 16-bit low-rank branch); empty when the kind has none."""
        return []

    def finish_float_training(self) -> None:
        """Reconstruction has trained `trainable_float_parameters()`: bring them to their stored precision."""

    # runtime export --------------------------------------------------------------------------------
    def float_paths(self) -> dict[str, str]:
        """What this kind computes itself around its quantized parts after export, by path name: how it
        runs (e.g. {'branch': 'float32 matmul'}); empty when the parts are all there is."""
        return {}

    # formats without kinds -------------------------------------------------------------------------
    def weight_pieces(self) -> dict[str, nn.Module]:
        """Parts whose weights, side by side along the input axis, are the float layer's weight; empty when
        the weight is no such concatenation (then `joined_weight` computes it)."""
        return self.quantized_parts()

    def joined_weight(self) -> torch.Tensor:
        """The float layer's weight as this kind computes it (dequantized, joined)."""
        pieces = [part.dequantized_weight() for part in self.weight_pieces().values()]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)).detach()

    def joined_bias(self) -> torch.Tensor | None:
        bias = self.plan_layer().bias
        return None if bias is None else bias.detach()


def register_kind(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: add a layer kind (a `LayerKind` module class with a unique `kind` name)."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not issubclass(cls, LayerKind):
        raise DiffquantError(f"{cls.__name__} cannot be a layer kind: subclass LayerKind and set a `kind` name.")
    if name in KINDS:
        raise DiffquantError(
            f"A layer kind named '{name}' is already registered ({KINDS[name].__qualname__}); "
            f"give {cls.__qualname__} another `kind` name."
        )
    KINDS[name] = cls
    return cls


def is_kind(module: nn.Module) -> bool:
    """Whether `module` is an instance of a registered layer kind (a subclass acts as the kind it extends)."""
    return isinstance(module, LayerKind) and isinstance(module, tuple(KINDS.values()))


def kind_for_plan(plan: Any) -> type[nn.Module] | None:
    """The registered kind a plan asks for; None for a plain quantized layer."""
    wanted = [cls for cls in KINDS.values() if cls.wants(plan)]
    if len(wanted) > 1:
        names = ", ".join(cls.kind for cls in wanted)
        raise ConfigError(f"A layer plan asks for several layer kinds at once ({names}); give it one.")
    return wanted[0] if wanted else None


def plan_fields_from_entry(entry: dict) -> dict:
    """`LayerPlan` fields beyond the specs from one saved structure entry: every kind reads its own."""
    if entry.get("kind") is not None and entry["kind"] not in KINDS:  # not a ValueError: loading shows it as is
        raise DiffquantError(
            f"The saved structure uses layer kind '{entry['kind']}', which is not registered here; import the "
            "module that registers it (`@register_kind`) before loading."
        )
    fields: dict = {}
    for cls in KINDS.values():
        fields.update(cls.read_plan_fields(entry))
    return fields


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every outermost layer-kind module (one per quantized float layer), in module order."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside) or not is_kind(module):
            continue
        yield name, module
        inside.append(f"{name}." if name else "")


def kind_owner(model: nn.Module, name: str) -> str:
    """The name of the outermost layer-kind module holding the quantized layer `name` (itself if none)."""
    parts = name.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if is_kind(model.get_submodule(prefix)):
            return prefix
    return name


def part_names(name: str, module: nn.Module) -> list[str]:
    """Full names of a kind module's quantized parts."""
    return [f"{name}.{part}" if part else name for part in module.quantized_parts()]
