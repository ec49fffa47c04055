"""Block-scaled float formats as stored bits: OCP MX (MXFP4/6/8, E8M0 scales) and NVIDIA NVFP4.

`Quantizer` simulates these formats with decoded fp32 block scales (see `functional.block_scales`);
this module encodes a grouped tensor into what a kernel or file holds - element codes, one scale code
per block and, for NVFP4, one fp32 tensor scale - and decodes it back bit-exactly.

References: OCP Microscaling Formats (MX) v1.0, sec. 5-6 (E8M0: code c is 2^(c-127), 255 is NaN;
X = 2^(floor(log2 amax) - emax_elem)); NVIDIA NVFP4 (E2M1 elements, group 16, E4M3 block scales,
fp32 tensor scale amax / (6 * 448)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import DiffquantError
from diffquant.quant.codes import bits_to_float, float_to_bits
from diffquant.quant.formats import NAMED_FLOAT_FORMATS, ScaledFloatFormat
from diffquant.quant.functional import block_scales, float_round, nvfp4_tensor_scale

E8M0_BIAS = 127
E8M0_NAN = 255


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 codes of power-of-two scales in [2^-127, 2^127]."""
    _, exponent = torch.frexp(scale.float())
    codes = exponent.to(torch.int64) - 1 + E8M0_BIAS
    if not torch.equal(torch.exp2((codes - E8M0_BIAS).double()).float(), scale.float()):
        raise DiffquantError("E8M0 holds only powers of two between 2^-127 and 2^127; got other scales.")
    return codes.to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 scales of E8M0 codes (255 decodes to NaN, as the spec says)."""
    codes = codes.to(torch.int64)
    values = torch.exp2((codes - E8M0_BIAS).double()).float()
    return torch.where(codes == E8M0_NAN, torch.full_like(values, float("nan")), values)


@dataclass
class EncodedBlocks:
    """A block-scaled tensor as stored: element codes (int64, one per value), scale codes (uint8, one
    per block) and the fp32 tensor scale (NVFP4; 1.0 for MX)."""

    elements: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor


def _check_view(view: torch.Tensor, fmt: ScaledFloatFormat) -> None:
    if view.ndim != 2 or view.shape[1] != fmt.block:
        raise DiffquantError(f"{fmt.name} encodes (blocks, {fmt.block}) views; got shape {tuple(view.shape)}.")


def encode_blocks(view: torch.Tensor, fmt: ScaledFloatFormat) -> EncodedBlocks:
    """Encode a (blocks, block) view: scales from each block's amax, elements rounded half-to-even and
    saturated at the element maximum."""
    _check_view(view, fmt)
    absmax = view.detach().float().abs().amax(1)
    scales = block_scales(absmax, fmt)
    elements = float_to_bits(float_round(view.float() / scales[:, None], fmt.element), fmt.element)
    if fmt.scale_encoding == "e8m0":
        return EncodedBlocks(elements, e8m0_encode(scales), torch.tensor(1.0))
    tensor_scale = nvfp4_tensor_scale(absmax)
    e4m3 = NAMED_FLOAT_FORMATS["e4m3"]
    # the decoded scale is fp32(e4m3 * t); dividing by t and rounding to E4M3 recovers the code exactly
    scale_codes = float_to_bits(float_round(scales / tensor_scale, e4m3), e4m3).to(torch.uint8)
    return EncodedBlocks(elements, scale_codes, tensor_scale)


def decode_scales(encoded: EncodedBlocks, fmt: ScaledFloatFormat) -> torch.Tensor:
    if fmt.scale_encoding == "e8m0":
        return e8m0_decode(encoded.scales)
    return bits_to_float(encoded.scales, NAMED_FLOAT_FORMATS["e4m3"]) * encoded.tensor_scale


def decode_blocks(encoded: EncodedBlocks, fmt: ScaledFloatFormat) -> torch.Tensor:
    """The (blocks, block) fp32 values an encoded tensor stands for."""
    return bits_to_float(encoded.elements, fmt.element) * decode_scales(encoded, fmt)[:, None]


def element_grid(fmt: ScaledFloatFormat) -> torch.Tensor:
    """Every value of the element format, by code (sign-magnitude order)."""
    return bits_to_float(torch.arange(2**fmt.element.storage_bits), fmt.element)
