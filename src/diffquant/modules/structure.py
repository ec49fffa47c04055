"""Structural facts about a denoiser found by running it once: the first and last weight layers."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.modules.layers import QuantLayer
from diffquant.modules.policy import WEIGHT_LAYER_TYPES


def run_with_hooks(run: Callable[[], object], handles: list) -> None:
    """Run `run` without gradients, then remove the hooks behind `handles` (also when it raises)."""
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


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
    run_with_hooks(run, handles)
    return order, fed_by_input


def input_and_output_layers(model: nn.Module, run: Callable[[], object]) -> tuple[str, str]:
    """(first layer applied to the input sample, last weight layer executed): what PTQ4DM and TFMQ-DM
    keep at higher precision."""
    order, fed_by_input = execution_order(model, run)
    first = next((name for name in order if name in fed_by_input), order[0])
    return first, order[-1]


def skip_concat_splits(model: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """For decoder blocks that concatenate [deep features, encoder skip] before a ResNet block: the
    shortcut conv of that ResNet block and the channel where its input splits.

    diffusers' up blocks receive the skips as `res_hidden_states_tuple` and pop one per ResNet
    block, so resnet j consumes skip -(j+1); its input has `in_channels - skip_channels` deep
    channels first. Found by running the model once; any UNet with that convention works.
    """
    splits: dict[str, int] = {}
    handles = []

    def make_hook(block_name: str, block: nn.Module):
        def hook(_module, args, kwargs):
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if not isinstance(skips, (tuple, list)):
                return
            for j, resnet in enumerate(block.resnets):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if shortcut is None or j >= len(skips):
                    continue
                deep = resnet.in_channels - skips[-(j + 1)].shape[1]
                if 0 < deep < resnet.in_channels:
                    splits[f"{block_name}.resnets.{j}.conv_shortcut"] = deep

        return hook

    for name, module in model.named_modules():
        if hasattr(module, "resnets") and "res_hidden_states_tuple" in inspect.signature(module.forward).parameters:
            handles.append(module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True))
    run_with_hooks(run, handles)
    return splits


def temporal_layers(
    model: nn.Module, run_with_sample: Callable[[torch.Tensor], object], sample: torch.Tensor
) -> list[str]:
    """Weight layers whose input depends only on the timestep and conditioning, not on the sample.

    These form TFMQ-DM's temporal information block (the time-embedding MLP and every block's time
    projection; adaLN modulation in a DiT). Found by running the model on two different samples with
    the same timesteps and comparing each layer's input.
    """
    seen: list[dict[str, torch.Tensor]] = [{}, {}]
    handles = []
    order: list[str] = []

    def make_hook(name: str):
        def hook(_module, args):
            seen[current[0]][name] = args[0].detach().clone()
            if name not in order:
                order.append(name)

        return hook

    current = [0]
    for name, module in model.named_modules():
        if isinstance(module, (*WEIGHT_LAYER_TYPES, QuantLayer)) and name:
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    generator = torch.Generator().manual_seed(0)
    if sample.is_floating_point():
        other = torch.randn(sample.shape, generator=generator) * sample.std().clamp_min(1.0)
    else:  # token grids (all-mask at the first step): random indices up to the largest one seen
        high = max(int(sample.max()) + 1, 2)
        other = torch.randint(0, high, sample.shape, generator=generator, dtype=sample.dtype)
    try:
        with torch.no_grad():
            run_with_sample(sample)
            current[0] = 1
            run_with_sample(other)
    finally:
        for handle in handles:
            handle.remove()
    return [n for n in order if n in seen[1] and torch.equal(seen[0][n], seen[1][n])]


def text_stream_layers(model: nn.Module, run: Callable[[], object], text_tokens: int) -> list[str]:
    """Weight layers fed the text stream: their (batch, tokens, channels) input has the text's token count.

    These see the BOS token of the prompt embedding (MixDQ's and DGQ's outlier). Found by running the
    model once; when the image stream has as many tokens as the text, the two cannot be told apart and
    the caller must name the layers.
    """
    tokens: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module, args):
            if torch.is_tensor(args[0]) and args[0].ndim == 3:
                tokens.setdefault(name, args[0].shape[1])

        return hook

    handles = [
        module.register_forward_pre_hook(make_hook(name))
        for name, module in model.named_modules()
        if isinstance(module, (*WEIGHT_LAYER_TYPES, QuantLayer)) and name
    ]
    run_with_hooks(run, handles)
    text = [name for name, count in tokens.items() if count == text_tokens]
    if text and len(text) == len(tokens):
        raise ConfigError(
            f"Every token-sequence layer sees {text_tokens} tokens, as many as the text: the text stream cannot be "
            "told apart from the image stream. Name the text layers explicitly (text_layers=...)."
        )
    return text


MODULATION_PREFIXES = ("AdaLayerNorm", "SD35AdaLayerNorm")
"""diffusers' adaptive norms (AdaLayerNorm, ...Zero, ...ZeroSingle, ...Continuous, ...Single, SD35...X)."""


def modulation_layers(model: nn.Module) -> list[str]:
    """The adaLN modulation linears: the weight layers directly inside a diffusers adaptive norm (its
    `linear`), not those of a timestep embedder nested in it (AdaLayerNormSingle's `emb`)."""
    names = []
    for parent_name, parent in model.named_modules():
        if type(parent).__name__.startswith(MODULATION_PREFIXES):
            prefix = f"{parent_name}." if parent_name else ""
            names += [prefix + n for n, child in parent.named_children() if isinstance(child, WEIGHT_LAYER_TYPES)]
    return sorted(names)
