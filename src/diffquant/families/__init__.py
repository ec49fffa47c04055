"""Model-family adapters: how to call, pack and split each family of diffusers denoisers.

`adapter_for(denoiser)` finds the family of a denoiser by its class (or a base class); a denoiser of
no known family gets a generic adapter read from its forward signature, or one clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.families.base import Conditioning, FamilyAdapter, class_names, wrapped_model
from diffquant.families.dit import DiTAdapter
from diffquant.families.flux import FluxAdapter
from diffquant.families.generic import generic_adapter
from diffquant.families.pixart import PixArtAdapter, SanaAdapter
from diffquant.families.qwenimage import QwenImageAdapter
from diffquant.families.sd3 import SD3Adapter
from diffquant.families.unet import UNet2DAdapter
from diffquant.families.unet_condition import UNet2DConditionAdapter
from diffquant.families.wan import WanAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (
    UNet2DAdapter(),
    UNet2DConditionAdapter(),
    DiTAdapter(),
    PixArtAdapter(),
    SanaAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    WanAdapter(),
    QwenImageAdapter(),
)
BY_CLASS: dict[str, FamilyAdapter] = {name: adapter for adapter in ADAPTERS for name in adapter.model_classes}
_GENERIC: dict[type, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Serve `adapter.model_classes` with `adapter` (a family added outside this package)."""
    for name in adapter.model_classes:
        BY_CLASS[name] = adapter
    return adapter


def _known(denoiser: nn.Module) -> bool:
    return any(klass.__name__ in BY_CLASS for klass in type(denoiser).__mro__)


def adapter_for(denoiser: nn.Module) -> FamilyAdapter:
    """The family adapter of a denoiser (its class or nearest known base class), else a generic one."""
    while not _known(denoiser) and (wrapped := wrapped_model(denoiser)) is not None:
        denoiser = wrapped
    for klass in type(denoiser).__mro__:
        if klass.__name__ in BY_CLASS:
            return BY_CLASS[klass.__name__]
    if type(denoiser) not in _GENERIC:
        _GENERIC[type(denoiser)] = generic_adapter(denoiser)
    return _GENERIC[type(denoiser)]


def denoise(denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning):
    """One denoiser evaluation by keyword through the denoiser's family adapter."""
    return adapter_for(denoiser).call(denoiser, sample, timestep, conditioning)


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FamilyAdapter",
    "adapter_for",
    "class_names",
    "denoise",
    "register_adapter",
]
