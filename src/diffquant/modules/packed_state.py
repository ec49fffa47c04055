"""A quantized model's state with its integer weight codes bit-packed, and the way back.

One packing for every file format that stores quantized layers (diffusers-style directories, token
denoisers): codes of `bits` bits take `bits` bits each on disk, everything else is stored as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.lowrank import BRANCH_DTYPE, BRANCH_SUFFIXES
from diffquant.modules.surgery import quant_layers
from diffquant.quant import pack_codes, unpack_codes

CODES_SUFFIX = ".weight_codes"
PACKED_SUFFIX = ".packed"


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(tensors to save, index of the packed ones): each `*.weight_codes` becomes `*.weight_codes.packed`."""
    layers = dict(quant_layers(model))
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for key, value in model.state_dict().items():
        if key.endswith(CODES_SUFFIX):
            bits = layers[key.removesuffix(CODES_SUFFIX)].weight_quantizer.spec.bits
            tensors[key + PACKED_SUFFIX] = pack_codes(value.to(torch.int64), bits)
            index[key] = {"bits": bits, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[1]}
        elif key.endswith(BRANCH_SUFFIXES) and _fits_branch_dtype(value):
            tensors[key] = value.detach().to(BRANCH_DTYPE).contiguous()  # loading copies it back into float32
        else:
            tensors[key] = value.detach().contiguous()
    return tensors, index


def _fits_branch_dtype(value: torch.Tensor) -> bool:
    """A low-rank branch is written in 16 bits when that loses nothing (a user's LoRA may not fit)."""
    return value.dtype == torch.float32 and torch.equal(value.to(BRANCH_DTYPE).float(), value)


def unpacked_state(tensors: dict[str, torch.Tensor], index: dict[str, dict[str, Any]], where: str) -> None:
    """Replace, in place, every packed entry of `tensors` named in `index` by its integer codes."""
    for key, entry in index.items():
        packed = tensors.pop(key + PACKED_SUFFIX, None)
        if packed is None:
            raise DiffquantError(f"{where} lacks the packed weights of '{key}': the file is corrupt.")
        count = 1
        for dim in entry["shape"]:
            count *= dim
        codes = unpack_codes(packed, entry["bits"], count).reshape(entry["shape"])
        tensors[key] = codes.to(getattr(torch, entry["dtype"]))
