"""Integer attention matmuls for methods that quantize them (Q-Diffusion, EDA-DM).

`Int8AttnProcessor` replaces a deployed model's `QuantAttnProcessor`: Q, K, V and the softmax output
become integer codes with the calibrated scales/zero-points (a step's row of a per-step bank, read
from the deployed model's clock), QK^T and softmax.V run on integer GEMMs, and the zero-points are
removed with row/column sums, so the result is the simulation's up to float rounding of the scales.

The batched integer GEMM is one opaque custom op (`diffquant::int8_bmm`): it loops `torch._int_mm`
over the batch x heads slices, or - for small slices, where a loop of tiny calls costs more than the
arithmetic - runs an fp32 batched GEMM on the same int8 values, which is exact as long as no partial
sum leaves fp32's 24-bit integer range (checked on the reduction length).

Opt-in (`export_model(..., integer_attention=True)`): on the CPU measured (one thread, compiled) it
was slower than the fake-quantized form that inductor fuses into the softmax pass - 0.50x at the
fmnist DiT's attention size, 0.75x at PixArt's - because the score matrix is memory-bound with head
dims of 32-72 and `torch._int_mm` has no batched or fused-softmax form.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.modules.attention import QuantAttnProcessor
from diffquant.quant import Quantizer
from diffquant.runtime.kernels import _InputQuantizer, input_supported

_LIBRARY = torch.library.Library("diffquant", "FRAGMENT")
_LIBRARY.define("int8_bmm(Tensor a, Tensor b) -> Tensor")

# |a|, |b| <= 128: each product is <= 2^14, so sums of up to 2^10 of them are exact in fp32
EXACT_FLOAT_REDUCTION = 2**10
# below this many multiply-adds per slice, one fp32 batched GEMM beats a loop of `_int_mm` calls
SMALL_SLICE = 2**21


def _int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 (B, M, N) = a (B, M, K) int8 @ b (B, N, K) int8 transposed, exactly."""
    batch, rows, depth = a.shape
    columns = b.shape[1]
    if rows * columns * depth <= SMALL_SLICE and depth <= EXACT_FLOAT_REDUCTION:
        return torch.bmm(a.float(), b.float().transpose(1, 2)).to(torch.int32)
    out = torch.empty((batch, rows, columns), dtype=torch.int32, device=a.device)
    for index in range(batch):
        torch._int_mm(a[index], b[index].t(), out=out[index])
    return out


_LIBRARY.impl("int8_bmm", _int8_bmm, "CPU")
_LIBRARY.impl("int8_bmm", _int8_bmm, "CUDA")


@torch.library.register_fake("diffquant::int8_bmm")
def _(a, b):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.int32)


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.diffquant.int8_bmm(a, b)


def attention_supported(processor: QuantAttnProcessor) -> bool:
    """Q, K and V on static per-tensor <= 8-bit integer grids (the probabilities too, or left in float)."""
    operands = (processor.query_quantizer, processor.key_quantizer, processor.value_quantizer)
    probs = processor.probs_quantizer
    probs_ok = probs is None or not probs.enabled or (input_supported(probs) and not processor.fp_text_bos)
    return all(input_supported(q) for q in operands) and probs_ok


class _Codes(nn.Module):
    """Int8 codes (uint8 grid shifted by -128) of an operand, with its scale and the shifted zero-point."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.grid = _InputQuantizer(quantizer)

    def attach_clock(self, clock: torch.Tensor) -> None:
        self.grid.attach_clock(clock)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = self.grid.params()
        codes = torch.clamp(torch.round(x / scale) + zero, self.grid.qmin, self.grid.qmax)
        return (codes - 128).to(torch.int8), scale, zero - 128


class Int8AttnProcessor(nn.Module):
    """diffusers attention with QK^T (and softmax.V when the method quantizes the probabilities) on
    integer GEMMs; the rest follows `QuantAttnProcessor` step for step."""

    kind = "attention"
    kernel = "diffquant::int8_bmm (torch._int_mm)"

    def __init__(self, processor: QuantAttnProcessor) -> None:
        super().__init__()
        self.query = _Codes(processor.query_quantizer)
        self.key = _Codes(processor.key_quantizer)
        self.value = _Codes(processor.value_quantizer)
        probs = processor.probs_quantizer
        self.probs = _Codes(probs) if probs is not None and probs.enabled else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # an explicit signature: diffusers inspects it to decide which keyword arguments to pass
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """QK^T of the dequantized operands: s_q s_k sum (a - z_q)(b - z_k), expanded around int8 a.b."""
        batch, heads, rows, depth = query.shape
        a, scale_q, zero_q = self.query(query.reshape(batch * heads, rows, depth))
        b, scale_k, zero_k = self.key(key.reshape(batch * heads, -1, depth))
        dot = int8_bmm(a, b).float()
        row_q = a.sum(-1, dtype=torch.int32).float().unsqueeze(-1)
        row_k = b.sum(-1, dtype=torch.int32).float().unsqueeze(-2)
        centered = dot - zero_k * row_q - zero_q * row_k + depth * zero_q * zero_k
        return (centered * (scale_q * scale_k)).reshape(batch, heads, rows, -1)

    def _weighted_values(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, heads, rows, length = probs.shape
        v, scale_v, zero_v = self.value(value.reshape(batch * heads, length, -1))
        if self.probs is None:
            return torch.matmul(probs, ((v.float() - zero_v) * scale_v).reshape(batch, heads, length, -1))
        p, scale_p, zero_p = self.probs(probs.reshape(batch * heads, rows, length))
        dot = int8_bmm(p, v.transpose(1, 2).contiguous()).float()
        row_p = p.sum(-1, dtype=torch.int32).float().unsqueeze(-1)
        column_v = v.sum(1, dtype=torch.int32).float().unsqueeze(-2)
        centered = dot - zero_v * row_p - zero_p * column_v + length * zero_p * zero_v
        return (centered * (scale_p * scale_v)).reshape(batch, heads, rows, -1)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = self._scores(query, key) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        hidden_states = self._weighted_values(scores.softmax(dim=-1), value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
