"""Structural facts about a denoiser found by running it once: the first and last weight layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffquant.modules.layers import QuantLayer
from diffquant.modules.policy import WEIGHT_LAYER_TYPES


def execution_order(model: nn.Module, run: Callable[[], object]) -> tuple[list[str], set[str]]:
    """Weight layers in the order `run()` calls them, and those whose input is the model's own input.

    `run` must call the model on inputs whose first positional tensor is the sample; layers fed that
    exact tensor (the same storage) are the input layers.
    """
    order: list[str] = []
    fed_by_input: set[str] = set()
    sample_pointer: list[int] = []

    def root_hook(_module, args, kwargs):
        first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        sample_pointer.append(first.data_ptr())

    def layer_hook(name):
        def hook(_module, args):
            if name not in order:
                order.append(name)
            if sample_pointer and torch.is_tensor(args[0]) and args[0].data_ptr() == sample_pointer[0]:
                fed_by_input.add(name)

        return hook

    handles = [model.register_forward_pre_hook(root_hook, with_kwargs=True)]
    for name, module in model.named_modules():
        if isinstance(module, (*WEIGHT_LAYER_TYPES, QuantLayer)):
            handles.append(module.register_forward_pre_hook(layer_hook(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return order, fed_by_input


def input_and_output_layers(model: nn.Module, run: Callable[[], object]) -> tuple[str, str]:
    """(first layer applied to the input sample, last weight layer executed): what PTQ4DM and TFMQ-DM
    keep at higher precision."""
    order, fed_by_input = execution_order(model, run)
    first = next((name for name in order if name in fed_by_input), order[0])
    return first, order[-1]
