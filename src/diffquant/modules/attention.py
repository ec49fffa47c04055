"""Quantized attention matmuls for diffusers' `Attention`: QK^T and softmax(QK^T)V.

`QuantAttnProcessor` is an attention processor and an nn.Module, so its quantizers live in the
model's state dict. It follows diffusers' AttnProcessor2_0 step for step; when its matmul quantizers
are all disabled it calls the same fused SDPA kernel, otherwise it computes the attention explicitly
with quantized Q, K (for QK^T), post-softmax probabilities and V (for PV), as Q-Diffusion does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.quant import Quantizer, QuantSpec


class QuantAttnProcessor(nn.Module):
    kind = "attention"

    def __init__(self, operand_spec: QuantSpec | None, probs_spec: QuantSpec | None) -> None:
        super().__init__()
        make = lambda spec: Quantizer(spec) if spec is not None else None  # noqa: E731
        self.query_quantizer = make(operand_spec)
        self.key_quantizer = make(operand_spec)
        self.value_quantizer = make(operand_spec)
        self.probs_quantizer = make(probs_spec)

    def quantizers(self) -> list[Quantizer]:
        return [q for q in (self.query_quantizer, self.key_quantizer, self.value_quantizer, self.probs_quantizer) if q]

    def _active(self) -> bool:
        return any(q.enabled for q in self.quantizers())

    @staticmethod
    def _apply(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
        return quantizer(x) if quantizer is not None else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # an explicit signature: diffusers inspects it to decide which keyword arguments to pass
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

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

        if self._active():
            query = self._apply(self.query_quantizer, query)
            key = self._apply(self.key_quantizer, key)
            value = self._apply(self.value_quantizer, value)
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = self._apply(self.probs_quantizer, scores.softmax(dim=-1))
            hidden_states = torch.matmul(probs, value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
