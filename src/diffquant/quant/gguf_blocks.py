"""GGUF's legacy block grids (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) on plain tensors.

Each block holds 32 consecutive values of a row with one fp16 scale d (plus an fp16 minimum m for
the `_1` types). Codes are unsigned: value = (code - offset) * d + m with offset 2^(bits-1) for the
`_0` types (m = 0) and 0 for the `_1` types. The round-to-nearest rules reproduce ggml's reference
quantizer (and the `gguf` Python package) bit for bit: the scale is computed in float32, codes from
its float32 reciprocal, and only then is the scale stored in fp16 (ggml-quants.c quantize_row_q4_0).
For the `_0` types the code is exactly diffquant's unsigned int{bits} code, so a quantizer on this
grid (group 32, scale = fp16(d), zero-point 0) writes its own codes into a GGUF file unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError

BLOCK_SIZE = 32
ZERO_SCALE_STANDIN = 1e-10
"""Scale kept in memory for blocks whose fp16 scale is 0 (it rounds to fp16 0 again on export)."""


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type."""

    name: str
    ggml_type: int
    """GGMLQuantizationType value in the file."""
    bits: int
    affine: bool
    """True for the `_1` types (a stored minimum), False for the symmetric `_0` types."""

    @property
    def offset(self) -> int:
        return 0 if self.affine else 2 ** (self.bits - 1)

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def bytes_per_block(self) -> int:
        scales = 4 if self.affine else 2  # fp16 d (and fp16 m)
        if self.bits == 8:
            return scales + BLOCK_SIZE
        return scales + (4 if self.bits == 5 else 0) + BLOCK_SIZE // 2  # 4 high bits words + nibbles


BLOCK_TYPES: dict[str, BlockType] = {
    "q8_0": BlockType("q8_0", 8, 8, False),
    "q5_0": BlockType("q5_0", 6, 5, False),
    "q5_1": BlockType("q5_1", 7, 5, True),
    "q4_0": BlockType("q4_0", 2, 4, False),
    "q4_1": BlockType("q4_1", 3, 4, True),
}
SYMMETRIC_TYPES = tuple(name for name, kind in BLOCK_TYPES.items() if not kind.affine)


def block_type(name: str) -> BlockType:
    key = name.strip().lower()
    if key not in BLOCK_TYPES:
        raise ConfigError(f"Unknown GGUF block type '{name}'. Choose one of: {', '.join(BLOCK_TYPES)}.")
    return BLOCK_TYPES[key]


def to_half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to fp16 and back (the stored scale)."""
    return x.to(torch.float16).to(torch.float32)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf: floor(|x|) + floor(2 * frac(|x|)), with the sign put back."""
    magnitude = x.abs()
    whole = torch.floor(magnitude)
    return torch.sign(x) * (whole + torch.floor(2 * (magnitude - whole)))


def block_scales(blocks: torch.Tensor, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (d, m) per block of a (G, 32) tensor, before fp16 rounding; m = 0 for `_0` types.

    `_0` types with fewer than 8 bits take d = v / -2^(bits-1) where v is the value of largest
    magnitude (sign included), so that value lands exactly on the outermost code.
    """
    blocks = blocks.float()
    if kind.affine:
        low, high = blocks.amin(1), blocks.amax(1)
        return (high - low) / (kind.levels - 1), low
    if kind.bits == 8:
        return blocks.abs().amax(1) / 127, torch.zeros(blocks.shape[0])
    index = blocks.abs().argmax(1, keepdim=True)
    extreme = torch.gather(blocks, 1, index).squeeze(1)
    return extreme / -float(kind.offset), torch.zeros(blocks.shape[0])


def rtn_codes(blocks: torch.Tensor, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's round-to-nearest: (codes int64 (G, 32), d fp32 (G,), m fp32 (G,)) for a (G, 32) tensor."""
    blocks = blocks.float()
    d, m = block_scales(blocks, kind)
    inverse = _reciprocal(d)[:, None]
    if kind.affine:
        codes = torch.trunc((blocks - m[:, None]) * inverse + 0.5)
    elif kind.bits == 8:
        codes = _round_half_away(blocks * inverse) + kind.offset
    else:
        codes = torch.trunc(blocks * inverse + (kind.offset + 0.5))
    return codes.clamp(0, kind.levels - 1).to(torch.int64), d, m


def dequantize(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """(code - offset) * fp16(d) + fp16(m), in float32 as ggml computes it."""
    values = to_half(d)[:, None] * (codes.to(torch.float32) - kind.offset)
    return values + to_half(m)[:, None] if kind.affine else values


def fake_quantize_rtn(blocks: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """The values a GGUF file holds for `blocks` under round-to-nearest."""
    codes, d, m = rtn_codes(blocks, kind)
    return dequantize(codes, d, m, kind)


# --- bytes --------------------------------------------------------------------------------------
def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Element j in the low nibble and element j + 16 in the high nibble of byte j (ggml's order)."""
    low, high = codes[:, :16] & 0x0F, codes[:, 16:] & 0x0F
    return (low | (high << 4)).to(torch.uint8)


def _high_bits(codes: torch.Tensor) -> torch.Tensor:
    """Bit j of a little-endian uint32 holds bit 4 of element j (Q5 types)."""
    bits = ((codes >> 4) & 1).reshape(-1, 4, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (bits * weights).sum(-1).to(torch.uint8)


def encode(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """GGUF block bytes (G, bytes_per_block) uint8 from codes (G, 32) and scales (G,)."""
    codes = codes.to(torch.int64)
    if codes.ndim != 2 or codes.shape[1] != BLOCK_SIZE:
        raise ValueError(f"codes must have shape (G, {BLOCK_SIZE}), got {tuple(codes.shape)}")
    if codes.min() < 0 or codes.max() >= kind.levels:
        raise ValueError(f"codes out of range for {kind.name}")
    parts = [_half_bytes(d)]
    if kind.affine:
        parts.append(_half_bytes(m))
    if kind.bits == 8:
        parts.append((codes - kind.offset).to(torch.int8).view(torch.uint8))
    else:
        if kind.bits == 5:
            parts.append(_high_bits(codes))
        parts.append(_nibbles(codes))
    return torch.cat(parts, 1)


def decode(raw: torch.Tensor, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `encode`: (codes int64 (G, 32), d, m) with d and m already fp16-rounded."""
    raw = raw.to(torch.uint8).reshape(-1, kind.bytes_per_block)
    d = raw[:, :2].contiguous().view(torch.float16).reshape(-1).float()
    position = 2
    m = torch.zeros_like(d)
    if kind.affine:
        m = raw[:, 2:4].contiguous().view(torch.float16).reshape(-1).float()
        position = 4
    if kind.bits == 8:
        codes = raw[:, position:].contiguous().view(torch.int8).to(torch.int64) + kind.offset
        return codes, d, m
    high = None
    if kind.bits == 5:
        packed = raw[:, position : position + 4].to(torch.int64)
        high = ((packed[:, :, None] >> torch.arange(8)) & 1).reshape(-1, BLOCK_SIZE)
        position += 4
    nibbles = raw[:, position:].to(torch.int64)
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], 1)
    if high is not None:
        codes = codes | (high << 4)
    return codes, d, m


def quantize_rows(x: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """Round-to-nearest GGUF bytes of a tensor whose last dimension is a multiple of 32, shaped like
    `gguf.quants.quantize`: (..., last / 32 * bytes_per_block)."""
    if x.shape[-1] % BLOCK_SIZE:
        raise ConfigError(f"A {kind.name} tensor needs a last dimension divisible by {BLOCK_SIZE}, got {x.shape}.")
    codes, d, m = rtn_codes(x.reshape(-1, BLOCK_SIZE), kind)
    return encode(codes, d, m, kind).reshape(*x.shape[:-1], -1)


def dequantize_rows(raw: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """Float32 values of GGUF bytes shaped (..., blocks * bytes_per_block)."""
    codes, d, m = decode(raw, kind)
    return dequantize(codes, d, m, kind).reshape(*raw.shape[:-1], -1)


# --- a quantizer on a GGUF grid -----------------------------------------------------------------
def check_gguf_spec(fmt: str, granularity: str, group_size: int | None, name: str) -> None:
    """A weight spec on a GGUF grid must be the grid's own integer format in groups of 32."""
    kind = block_type(name)
    if kind.affine:
        raise ConfigError(
            f"Calibrated weights can sit on the symmetric GGUF grids only ({', '.join(SYMMETRIC_TYPES)}); "
            f"export a float or {kind.name.replace('_1', '_0')} model as {kind.name} instead."
        )
    if fmt != f"int{kind.bits}" or granularity != "group" or group_size != BLOCK_SIZE:
        raise ConfigError(
            f"A {kind.name} weight grid is int{kind.bits} in groups of {BLOCK_SIZE}; got {fmt}, {granularity}"
            f"{'' if group_size is None else f' {group_size}'}."
        )


def block_grid_params(view: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per group for a quantizer on a `_0` grid: scale = fp16(d), zero-point 0."""
    d, _ = block_scales(view, block_type(name))
    scale = to_half(d)
    scale = torch.where(scale == 0, torch.full_like(scale, ZERO_SCALE_STANDIN), scale)
    return scale, torch.zeros_like(scale)


def gguf_rtn_codes(view: torch.Tensor, name: str) -> torch.Tensor:
    return rtn_codes(view, block_type(name))[0]


def gguf_rtn_values(view: torch.Tensor, name: str) -> torch.Tensor:
    return fake_quantize_rtn(view, block_type(name)).to(view.dtype)
