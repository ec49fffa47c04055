"""Bit packing of unsigned integer codes into bytes, for every width from 1 to 16 bits.

Widths that divide 8 (1, 2, 4, 8) pack whole codes per byte, lowest bits first (a 4-bit byte holds
code 2i in its low nibble and 2i+1 in its high nibble). Other widths use a little-endian bit stream.
"""

from __future__ import annotations

import numpy as np
import torch

from diffquant.errors import DiffquantError


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in [0, 2^bits) (any shape, flattened) into a 1-D uint8 tensor."""
    if not 1 <= bits <= 16:
        raise DiffquantError(f"Can pack 1- to 16-bit codes, got {bits} bits.")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise DiffquantError(f"Codes out of range for {bits}-bit packing: [{flat.min()}, {flat.max()}].")
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_byte)).reshape(-1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.int64) * bits
        return (padded << shifts).sum(1).to(torch.uint8)
    planes = ((flat.numpy()[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as int64."""
    if not 1 <= bits <= 16:
        raise DiffquantError(f"Can unpack 1- to 16-bit codes, got {bits} bits.")
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(count, bits):
        raise DiffquantError(
            f"Packed weights hold {packed.numel()} bytes of {packed.dtype}; {count} {bits}-bit codes need "
            f"{packed_size(count, bits)} uint8 bytes. The file is corrupt or from another layout."
        )
    raw = packed.reshape(-1).to(torch.int64)
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.int64) * bits
        return ((raw[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    stream = np.unpackbits(packed.numpy(), bitorder="little")[: count * bits].reshape(count, bits)
    return torch.from_numpy((stream.astype(np.int64) << np.arange(bits)).sum(1))
