"""An adapter for a denoiser of no known family, read from its forward signature and diffusers'
own structure hints (`_repeated_blocks`, `_no_split_modules`)."""

from __future__ import annotations

import inspect

from torch import nn

from diffquant.errors import DiffquantError
from diffquant.families.base import FamilyAdapter

SAMPLE_NAMES = ("sample", "hidden_states", "x")
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
ATTENTION_CLASSES = ("Attention", "AttentionModuleMixin")
NOT_INPUTS = {"self", "return_dict", "kwargs", "args"}


def generic_adapter(denoiser: nn.Module) -> FamilyAdapter:
    """A keyword-calling adapter from `forward`'s parameter names, or one clear error."""
    family = type(denoiser).__name__
    parameters = list(inspect.signature(denoiser.forward).parameters)
    sample = next((p for p in SAMPLE_NAMES if p in parameters), None)
    timestep = next((p for p in TIMESTEP_NAMES if p in parameters), None)
    if sample is None or timestep is None:
        raise DiffquantError(
            f"Model family '{family}' has no diffquant adapter, and its forward({', '.join(parameters)}) names no "
            f"sample ({'/'.join(SAMPLE_NAMES)}) or timestep ({'/'.join(TIMESTEP_NAMES)}) argument. Add an adapter: "
            "one file in src/diffquant/families/ subclassing FamilyAdapter, listed in families/__init__.py "
            "(see CONTRIBUTING.md, 'Adding a model family')."
        )
    hinted = tuple(getattr(denoiser, "_repeated_blocks", None) or getattr(denoiser, "_no_split_modules", None) or ())
    attributes = {
        "name": f"generic:{family}",
        "model_classes": (family,),
        "sample_arg": sample,
        "timestep_arg": timestep,
        "conditioning": tuple(p for p in parameters if p not in NOT_INPUTS | {sample, timestep}),
        "blocks": hinted + ATTENTION_CLASSES,
        "takes_return_dict": "return_dict" in parameters,
    }
    return type(f"Generic{family}Adapter", (FamilyAdapter,), attributes)()
