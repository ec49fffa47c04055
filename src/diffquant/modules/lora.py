"""A user's LoRA on a quantized model: named 16-bit low-rank branches beside any layer.

`LoRAHost` wraps one layer - float, fake-quantized (any layer kind) or already converted to a
backend's kernel - and adds y = layer(x) + sum_a w_a * s_a * B_a(A_a(x)) over its active adapters,
where s_a = alpha_a / r_a is the adapter's own scaling and w_a the run-time weight set with
`set_adapter_weights` (diffusers' `set_adapters`). The layer itself is never touched: no merge, no
re-quantization, and `detach_adapters` puts the very same module object back, so the outputs return
bit-exactly. A branch runs as a float matmul (a conv with the layer's geometry, then a 1x1 conv)
beside whatever kernel the layer runs on.

Hosts wrapped before runtime export keep their branch: export converts the quantized layer inside
(`host.layer`) and leaves the branch as it is; kernel fusions skip hosted layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.modules.kinds import is_kind


@dataclass(frozen=True)
class LoRAFactors:
    """One adapter's factors for one layer, as a LoRA file stores them."""

    down: torch.Tensor
    """A: (r, in) for a linear, (r, in, kh, kw) for a conv."""
    up: torch.Tensor
    """B: (out, r) (a trailing 1x1 of a conv's B is dropped)."""
    alpha: float
    """The adapter's alpha: the branch is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    rslora: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)


class LoRABranch(nn.Module):
    """scaling * B(A(x)) for one adapter on one layer; weights kept in the file's (16-bit) dtype."""

    def __init__(self, factors: LoRAFactors, conv_args: tuple | None) -> None:
        super().__init__()
        self.register_buffer("down", factors.down.detach().clone())
        self.register_buffer("up", factors.up.detach().clone())
        self.scaling = factors.scaling
        self.conv_args = conv_args

    def forward(self, x: torch.Tensor, weight: float) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv_args is not None:
            hidden = F.conv2d(x, down, None, *self.conv_args)
            out = F.conv2d(hidden, up[:, :, None, None])
        else:
            out = F.linear(F.linear(x, down), up)
        return out * (weight * self.scaling)


class LoRAHost(nn.Module):
    """A layer with named LoRA branches beside it (see the module docstring)."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...], conv_args: tuple | None) -> None:
        super().__init__()
        self.layer = layer
        self.shape = shape  # the float weight's shape: (out, in) or (out, in, kh, kw)
        self.conv_args = conv_args
        self.branches = nn.ModuleDict()
        self.weights: dict[str, float] = {}  # run-time weight of each adapter; 0 switches it off

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # diffusers code may read the layer's own attributes (weight, in_features ...)
            if name == "layer":
                raise
            return getattr(self._modules["layer"], name)

    def add(self, name: str, factors: LoRAFactors, weight: float) -> None:
        self.branches[name] = LoRABranch(factors, self.conv_args)
        self.weights[name] = float(weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(x, *args, **kwargs)
        for name, branch in self.branches.items():
            weight = self.weights[name]
            if weight != 0.0:  # an inactive adapter costs nothing and changes nothing
                out = out + branch(x, weight)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={b.down.shape[0]} x {self.weights[name]:g}" for name, b in self.branches.items())


# geometry of the layer a branch sits beside ------------------------------------------------------


def layer_weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The float weight shape of a float, quantized or converted layer; None for a module that is no layer."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return tuple(module.weight.shape)
    if is_kind(module):
        return tuple(module.joined_weight().shape)
    shape = getattr(module, "weight_shape", None)  # backend kernels that keep only packed codes name it
    if shape is not None:
        return tuple(shape)
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def layer_conv_args(module: nn.Module) -> tuple | None:
    """(stride, padding, dilation) of a conv-like layer (or of its first part), None when it has none."""
    for candidate in (module, *module.children()):
        if hasattr(candidate, "conv_args"):
            return tuple(candidate.conv_args[:3])
        if hasattr(candidate, "stride") and hasattr(candidate, "padding"):
            return (candidate.stride, candidate.padding, getattr(candidate, "dilation", 1))
    return None


def check_factors(name: str, shape: tuple[int, ...], factors: LoRAFactors) -> str | None:
    """Why `factors` cannot sit beside a layer with float weight `shape` (None when they fit)."""
    down, up = factors.down, factors.up
    if up.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"'{name}': lora_B has rank {up.shape[1] if up.ndim == 2 else '?'}, lora_A has rank {down.shape[0]}"
    expected_down = (down.shape[0], *shape[1:])
    if tuple(down.shape) != expected_down or up.shape[0] != shape[0]:
        return (
            f"'{name}': lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} do not fit the layer's weight "
            f"{shape} (expected lora_A {expected_down}, lora_B ({shape[0]}, r))"
        )
    return None


# attaching to a model ----------------------------------------------------------------------------


def lora_hosts(model: nn.Module) -> Iterator[tuple[str, LoRAHost]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRAHost):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters loaded on `model`, in loading order."""
    names: dict[str, None] = {}
    for _, host in lora_hosts(model):
        names.update(dict.fromkeys(host.branches))
    return list(names)


def _host_for(model: nn.Module, name: str) -> tuple[LoRAHost | None, nn.Module]:
    module = model.get_submodule(name)
    return (module, module.layer) if isinstance(module, LoRAHost) else (None, module)


def plan_attachment(model: nn.Module, adapter: dict[str, LoRAFactors]) -> list[str]:
    """Every reason `adapter` (module name -> factors) cannot be attached to `model`; empty when it can."""
    problems = []
    for name, factors in adapter.items():
        try:
            host, layer = _host_for(model, name)
        except AttributeError:
            problems.append(f"'{name}' matches no module of the model")
            continue
        if getattr(layer, "fused_with_neighbours", False):
            continue  # `fused_layers` reports these with their own fix
        shape = host.shape if host is not None else layer_weight_shape(layer)
        if shape is None or len(shape) not in (2, 4):
            problems.append(f"'{name}' is a {type(layer).__name__}, not a linear or conv layer")
            continue
        if (len(shape) == 4) != (factors.down.ndim == 4) or (len(shape) == 4 and layer_conv_args(layer) is None):
            problems.append(f"'{name}': a {factors.down.ndim}-d lora_A does not fit the layer's weight {shape}")
            continue
        problem = check_factors(name, shape, factors)
        if problem:
            problems.append(problem)
    return problems


def fused_layers(model: nn.Module, adapter: dict[str, LoRAFactors]) -> list[str]:
    """The adapter's layers that a backend fused with their neighbours (no float input/output of their own)."""
    fused = []
    for name in adapter:
        try:
            _, layer = _host_for(model, name)
        except AttributeError:
            continue
        if getattr(layer, "fused_with_neighbours", False):
            fused.append(name)
    return fused


def attach_adapter(model: nn.Module, adapter_name: str, adapter: dict[str, LoRAFactors], weight: float = 1.0) -> int:
    """Attach one named adapter (module name -> factors) beside `model`'s layers; returns how many layers.

    Everything is checked before anything changes: one error lists the keys that match no layer and the
    factors whose rank or shape do not fit.
    """
    if not adapter:
        raise ConfigError(f"LoRA '{adapter_name}' holds no lora_A/lora_B pairs.")
    if adapter_name in adapter_names(model):
        raise ConfigError(f"An adapter named '{adapter_name}' is already loaded; unload it or give another name.")
    fused = fused_layers(model, adapter)
    if fused:
        raise DiffquantError(
            f"LoRA '{adapter_name}' targets layers that run fused with their neighbours on the deployed kernels "
            f"({', '.join(fused[:4])}{' ...' if len(fused) > 4 else ''}): load the LoRA onto the quantized model "
            "before export_model (the CLI's --lora with --backend does that), and export it with the LoRA on."
        )
    problems = plan_attachment(model, adapter)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(
            f"LoRA '{adapter_name}' does not fit this model: {shown}. Check that the LoRA was trained on this "
            "model's architecture (same module names and sizes)."
        )
    for name, factors in adapter.items():
        host, layer = _host_for(model, name)
        if host is None:
            conv_args = layer_conv_args(layer) if factors.down.ndim == 4 else None
            host = LoRAHost(layer, layer_weight_shape(layer), conv_args)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, host)
        host.add(adapter_name, factors, weight)
    return len(adapter)


def set_adapter_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Set each named adapter's run-time weight (0 switches it off; adapters not named keep theirs)."""
    known = adapter_names(model)
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise ConfigError(f"No adapter named {', '.join(map(repr, unknown))} is loaded; loaded: {known or 'none'}.")
    for _, host in lora_hosts(model):
        for name, weight in weights.items():
            if name in host.weights:
                host.weights[name] = float(weight)


def detach_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Remove the named adapters (all when None); a layer left without adapters gets its own module back."""
    known = adapter_names(model)
    if names is not None and (unknown := [n for n in names if n not in known]):
        raise DiffquantError(f"No adapter named {', '.join(map(repr, unknown))} is loaded; loaded: {known or 'none'}.")
    for name, host in list(lora_hosts(model)):
        for adapter in list(host.branches) if names is None else [n for n in names if n in host.branches]:
            del host.branches[adapter]
            del host.weights[adapter]
        if not host.branches:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, host.layer)
