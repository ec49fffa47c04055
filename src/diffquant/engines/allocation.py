"""Mixed-precision bit allocation as an integer program (MixDQ, ViDiT-Q-MP, HAWQ-V3 style).

Each layer l picks exactly one bit width b from its candidates; picking costs sensitivity[l][b] (any
additive error proxy: output MSE, FID proxy, Hessian trace x perturbation) and uses size[l] * b bits.
`allocate_bits` minimises the total cost under a bit budget with scipy.optimize.milp (HiGHS), exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from diffquant.errors import ConfigError, DiffquantError


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]
    """The chosen bit width of every layer."""
    cost: float
    """Sum of the chosen sensitivities."""
    total_bits: int
    """Sum of size x bits over the layers."""


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    sizes: dict[str, int],
    budget_bits: int,
    exact: bool = False,
) -> Allocation:
    """The allocation with the smallest total sensitivity using at most `budget_bits` bits (exactly
    `budget_bits` with `exact=True`)."""
    if set(sensitivity) != set(sizes) or not sensitivity:
        raise ConfigError("sensitivity and sizes must name the same, non-empty set of layers.")
    layers = list(sensitivity)
    choices = [(layer, bits) for layer in layers for bits in sorted(sensitivity[layer])]
    if any(not sensitivity[layer] for layer in layers):
        raise ConfigError("Every layer needs at least one candidate bit width.")
    cost = np.array([float(sensitivity[layer][bits]) for layer, bits in choices])
    usage = np.array([float(sizes[layer] * bits) for layer, bits in choices])
    one_each = np.array([[1.0 if layer == name else 0.0 for layer, _ in choices] for name in layers])
    budget_low = float(budget_bits) if exact else 0.0
    constraints = [
        LinearConstraint(one_each, np.ones(len(layers)), np.ones(len(layers))),
        LinearConstraint(usage[None, :], budget_low, float(budget_bits)),
    ]
    result = milp(cost, constraints=constraints, integrality=np.ones(len(choices)), bounds=Bounds(0, 1))
    if not result.success or result.x is None:
        smallest = sum(min(sensitivity[layer]) * sizes[layer] for layer in layers)
        raise DiffquantError(
            f"No bit allocation fits a budget of {budget_bits} bits{' exactly' if exact else ''} "
            f"(the smallest uses {smallest}): raise the budget or add candidate widths. ({result.message})"
        )
    picked = np.round(result.x).astype(bool)
    bits = {layer: b for (layer, b), chosen in zip(choices, picked, strict=True) if chosen}
    return Allocation(bits, float(cost[picked].sum()), int(usage[picked].sum()))


def budget_for_average_bits(sizes: dict[str, int], average_bits: float) -> int:
    """The budget in bits of `average_bits` per weight over all layers."""
    return int(round(average_bits * sum(sizes.values())))
