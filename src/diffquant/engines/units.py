"""Reconstruction units discovered from the diffusers module tree (BRECQ-style scopes).

Blocks are the repeated blocks the model's family adapter declares (ResNet blocks and attention for
UNets, transformer blocks for DiTs, joint blocks for SD3/Flux, ...). Every quantized layer outside a
block is reconstructed alone. Units are listed in execution order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from diffquant.errors import ConfigError
from diffquant.families import adapter_for
from diffquant.modules.kinds import part_names, quantized_modules
from diffquant.modules.layers import QuantLayer
from diffquant.modules.policy import pattern_matches
from diffquant.modules.structure import run_with_hooks


@dataclass
class ReconstructionUnit:
    """A module whose output is matched to full precision, and the quantized layers inside it."""

    name: str
    kind: str  # "block" or "layer"
    layers: list[str] = field(default_factory=list)


def _quant_leaves(module: nn.Module, prefix: str) -> list[str]:
    names = []
    for name, child in module.named_modules():
        if isinstance(child, QuantLayer):
            names.append(f"{prefix}.{name}" if name else prefix)
    return names


def discover_units(
    model: nn.Module,
    run: Callable[[], object],
    exclude_layers: set[str] = frozenset(),
    block_patterns: tuple[str, ...] | None = None,
) -> list[ReconstructionUnit]:
    """Blocks and lone layers holding quantized layers, in the order a forward pass reaches them.

    `block_patterns` restricts which blocks are used (others dissolve into lone layers); a pattern
    matching no block is an error. Layers in `exclude_layers` (e.g. TFMQ's temporal layers) are left out.
    """
    blocks = dict(adapter_for(model).find_blocks(model))  # an attention inside a block belongs to it
    if block_patterns is not None:
        for pattern in block_patterns:
            if not any(pattern_matches(pattern, name) for name in blocks):
                raise ConfigError(
                    f"Block pattern '{pattern}' matches no reconstruction block. "
                    f"Blocks: {', '.join(list(blocks)[:6])}..."
                )
        blocks = {n: m for n, m in blocks.items() if any(pattern_matches(p, n) for p in block_patterns)}

    units: dict[str, ReconstructionUnit] = {}
    covered: set[str] = set()
    for name, module in blocks.items():
        layers = [n for n in _quant_leaves(module, name) if n not in exclude_layers]
        if layers:
            units[name] = ReconstructionUnit(name, "block", layers)
            covered.update(_quant_leaves(module, name))
    for name, module in quantized_modules(model):  # a layer kind's parts (a split conv's halves) form one unit
        layers = [n for n in part_names(name, module) if n not in covered and n not in exclude_layers]
        if layers:
            units[name] = ReconstructionUnit(name, "layer", layers)

    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, _a, name=name: order.append(name) if name not in order else None
        )
        for name in units
    ]
    run_with_hooks(run, handles)
    missing = [name for name in units if name not in order]
    if missing:
        raise ConfigError(f"Quantized modules {missing[:3]} are never called on the calibration inputs.")
    return [units[name] for name in order]
