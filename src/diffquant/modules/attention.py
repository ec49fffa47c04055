"""Quantized attention matmuls, QK^T and softmax(QK^T)V, around a model's own attention processor.

`QuantAttnProcessor` wraps the processor an attention module already has (AttnProcessor2_0, SD3's
JointAttnProcessor2_0, FluxAttnProcessor, Wan's, ...), so joint and dual-stream attention keep their
own projections, norms and rotary embeddings. With every matmul quantizer off it calls that processor
untouched (bit-identical outputs). Otherwise, for the duration of the call, it replaces
`torch.nn.functional.scaled_dot_product_attention` - which diffusers' processors and its native
attention dispatch call - by an explicit attention with quantized Q, K (for QK^T), post-softmax
probabilities and V (for PV), as Q-Diffusion does. It is an nn.Module, so its quantizers live in the
model's state dict.

With `fp_text_bos`, the key column of the text's first (BOS/<start>) token keeps its float probability
and stays out of the probabilities' range (DGQ): background pixels pile their attention onto that
token, so its column would otherwise set the scale for every other prompt token. SD3's joint
attention puts the text keys after the image keys; cross-attention and Flux-style joint attention
put them first.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.quant import Quantizer, QuantSpec

TORCH_SDPA = F.scaled_dot_product_attention
"""PyTorch's fused attention, held before `_quantized_sdpa` swaps the module attribute during a call."""


def additive_mask(
    mask: torch.Tensor | None, is_causal: bool, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """SDPA's mask arguments as one additive mask over (queries, keys) scores: a boolean mask's False and
    the causal upper triangle become -inf; None when nothing is masked."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    if is_causal:
        causal = torch.ones(shape, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(shape, dtype=dtype, device=device).masked_fill(~causal, float("-inf"))
        mask = causal if mask is None else mask + causal
    return mask


class QuantAttnProcessor(nn.Module):
    kind = "attention"

    def __init__(
        self, operand_spec: QuantSpec | None, probs_spec: QuantSpec | None, inner: Any = None, fp_text_bos: bool = False
    ) -> None:
        super().__init__()
        self.fp_text_bos = fp_text_bos
        self._stream_tokens: tuple[int, int | None] = (0, None)  # (image, text) tokens of the current call
        make = lambda spec: Quantizer(spec) if spec is not None else None  # noqa: E731
        self.query_quantizer = make(operand_spec)
        self.key_quantizer = make(operand_spec)
        self.value_quantizer = make(operand_spec)
        self.probs_quantizer = make(probs_spec)
        self.deployed_attention: Any = None
        """A backend's form of softmax(QK^T)V over the quantized operands, called as `_attention` is
        (the openvino backend sets `OpenVINOAttention`); None: the simulation's, spelled out below."""
        # the model's own processor; kept out of the module tree so the state dict has only quantizers
        object.__setattr__(self, "inner", inner if inner is not None else AttnProcessor2_0())

    def quantizers(self) -> list[Quantizer]:
        return [q for q in (self.query_quantizer, self.key_quantizer, self.value_quantizer, self.probs_quantizer) if q]

    def _active(self) -> bool:
        return any(q.enabled for q in self.quantizers())

    @staticmethod
    def _apply(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
        return quantizer(x) if quantizer is not None else x

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self._active():
            return self.inner(attn, hidden_states, *args, **kwargs)
        text = kwargs.get("encoder_hidden_states", args[0] if args else None)
        text_tokens = text.shape[1] if torch.is_tensor(text) and text.ndim == 3 else None
        self._stream_tokens = (hidden_states.shape[1] if hidden_states.ndim == 3 else 0, text_tokens)
        with self._quantized_sdpa() as calls:
            output = self.inner(attn, hidden_states, *args, **kwargs)
        if not calls:
            raise DiffquantError(
                f"{type(self.inner).__name__} computed attention without scaled_dot_product_attention (another "
                "attention backend?), so its matmuls cannot be quantized. Use diffusers' native backend."
            )
        return output

    @contextmanager
    def _quantized_sdpa(self):
        original = F.scaled_dot_product_attention
        calls: list[int] = []

        def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            calls.append(1)
            return self._attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)

        torch.nn.functional.scaled_dot_product_attention = attention
        try:
            yield calls
        finally:
            torch.nn.functional.scaled_dot_product_attention = original

    def _attention(self, query, key, value, mask, is_causal, scale, enable_gqa) -> torch.Tensor:
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        if self.deployed_attention is not None:
            return self.deployed_attention(query, key, value, mask, is_causal, scale)
        query = self._apply(self.query_quantizer, query)
        key = self._apply(self.key_quantizer, key)
        value = self._apply(self.value_quantizer, value)
        scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        probs = self.probabilities(torch.matmul(query, key.transpose(-1, -2)) * scale, mask, is_causal)
        return torch.matmul(probs, value)

    def probabilities(self, scores: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The quantized softmax of scaled scores under the call's mask (boolean or additive)."""
        mask = additive_mask(mask, is_causal, scores.shape[-2:], scores.dtype, scores.device)
        return self._quantize_probs((scores if mask is None else scores + mask).softmax(dim=-1))

    def bos_column(self, key_tokens: int) -> int | None:
        """The key index of the text's BOS token in this call, or None without text."""
        image, text = self._stream_tokens
        if text is None:
            return None
        if key_tokens == text:
            return 0
        if key_tokens == image + text:
            return image if type(self.inner).__name__.startswith("Joint") else 0
        raise DiffquantError(
            f"Cannot place the BOS token among {key_tokens} keys ({image} image and {text} text tokens in this "
            "call): this attention layout is unknown; quantize it without fp_text_bos."
        )

    def _quantize_probs(self, probs: torch.Tensor) -> torch.Tensor:
        quantizer = self.probs_quantizer
        column = self.bos_column(probs.shape[-1]) if self.fp_text_bos and quantizer is not None else None
        if column is None:
            return self._apply(quantizer, probs)
        others = torch.cat([probs[..., :column], probs[..., column + 1 :]], -1)
        quantized = quantizer(others)
        return torch.cat([quantized[..., :column], probs[..., column : column + 1], quantized[..., column:]], -1)


@cache
def _wrapper_class(inner_class: type) -> type:
    """A QuantAttnProcessor subclass whose `__call__` shows `inner_class.__call__`'s signature:
    diffusers reads it to decide which keyword arguments the processor accepts."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return nn.Module.__call__(self, attn, hidden_states, *args, **kwargs)

    signature = inspect.signature(inner_class.__call__)
    __call__.__signature__ = signature
    return type(f"Quant{inner_class.__name__}", (QuantAttnProcessor,), {"__call__": __call__})


def wrap_processor(
    inner: Any, operand_spec: QuantSpec | None, probs_spec: QuantSpec | None, fp_text_bos: bool = False
) -> QuantAttnProcessor:
    """Quantized matmuls around `inner`, an attention module's own processor (a wrapper is unwrapped first)."""
    if isinstance(inner, QuantAttnProcessor):
        inner = inner.inner
    return _wrapper_class(type(inner))(operand_spec, probs_spec, inner, fp_text_bos)
