"""Quantized `nn.Linear` and `nn.Conv2d`: an input quantizer, a weight quantizer and frozen codes.

Until `freeze()` the weight is fake-quantized on every call (so rounding and step sizes can be
trained through it); after `freeze()` the layer holds the integer codes of its weight and computes
the weight from them, so a saved and reloaded layer is bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.kinds import LayerKind, register_kind
from diffquant.quant import IntFormat, Quantizer, QuantSpec, from_codes, group_view, to_codes, ungroup
from diffquant.quant.adaround import AdaRoundState, adaround_quantize


class QuantLayer(LayerKind, nn.Module):
    """Shared machinery of the quantized weight layers (the protocol backends convert)."""

    kind = "layer"

    def __init__(self, original: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.weight_quantizer = Quantizer(weight_spec) if weight_spec is not None else None
        self.input_quantizer = Quantizer(input_spec) if input_spec is not None else None
        self.register_buffer("weight_codes", None)
        self._frozen_weight: torch.Tensor | None = None
        self.rounding: AdaRoundState | None = None

    # weight ----------------------------------------------------------------------------------
    def calibrate_weight(self) -> None:
        """Fix the weight quantizer's scale/zero-point from the weight itself."""
        if self.weight_quantizer is not None and self.weight_codes is None:
            self.weight_quantizer.calibrate_static(self.weight)

    @property
    def frozen(self) -> bool:
        return self.weight_codes is not None

    def start_adaround(self) -> AdaRoundState:
        """Attach learnable rounding (AdaRound) to this layer's integer weight grid."""
        quantizer = self.weight_quantizer
        if quantizer is None or not isinstance(quantizer.fmt, IntFormat):
            raise DiffquantError("AdaRound needs an integer weight quantizer.")
        view = group_view(self.weight.detach(), quantizer.grouping)
        scale, _ = quantizer.current_params(view)
        self.rounding = AdaRoundState(view, scale)
        return self.rounding

    def _rounded_weight(self) -> torch.Tensor:
        quantizer = self.weight_quantizer
        view = group_view(self.weight, quantizer.grouping)
        scale, zero_point = quantizer.current_params(view)
        rounded = adaround_quantize(view, scale, zero_point, quantizer.fmt, self.rounding.alpha, self.rounding.soft)
        return ungroup(rounded, self.weight.shape, quantizer.grouping)

    def freeze(self) -> None:
        """Replace the float weight by its integer codes (the deployable form)."""
        if self.weight_quantizer is None or self.frozen:
            return
        quantizer = self.weight_quantizer
        view = group_view(self.weight.detach(), quantizer.grouping)
        scale, zero_point = quantizer.current_params(view)
        if self.rounding is not None:  # learned rounding decides up or down per weight
            hard = adaround_quantize(view, scale, zero_point, quantizer.fmt, self.rounding.alpha.detach(), soft=False)
            codes = to_codes(hard, scale, zero_point, quantizer.fmt)
            self.rounding = None
        else:
            codes = quantizer.rtn_codes(view)
        self._frozen_shape = self.weight.shape
        del self.weight
        self.weight_codes = codes.to(torch.int16 if quantizer.spec.bits <= 15 else torch.int32)
        self._frozen_weight = None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: float, fake-quantized, or decoded from codes."""
        if self.weight_quantizer is None:
            return self.weight
        if not self.frozen:
            if self.rounding is not None:
                return self._rounded_weight()
            return self.weight_quantizer(self.weight)
        if self._frozen_weight is None:
            quantizer = self.weight_quantizer
            scale, zero_point = quantizer.current_params()
            view = from_codes(self.weight_codes, scale, zero_point, quantizer.fmt)
            self._frozen_weight = ungroup(view, self._frozen_shape, quantizer.grouping)
        return self._frozen_weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        codes = state_dict.get(prefix + "weight_codes")
        if codes is not None:  # a frozen layer: adopt the codes, drop the float weight
            if "weight" in self._parameters:
                self._frozen_shape = self.weight.shape
                del self.weight
            self.weight_codes = codes.clone()
            self._frozen_weight = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._frozen_weight = None

    def __getattr__(self, name: str):
        if name == "weight" and "weight_codes" in self._buffers and self._buffers["weight_codes"] is not None:
            return self.dequantized_weight()  # diffusers code may read .weight (e.g. for its dtype)
        return super().__getattr__(name)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x


class _PlainKind:
    """Plain layers are what a plan without a kind becomes (`wrap_layer`); their saved entry holds only specs."""

    @classmethod
    def wants(cls, plan) -> bool:
        return False

    def plan_fields(self) -> dict:
        return {}

    @classmethod
    def read_plan_fields(cls, entry: dict) -> dict:
        return {}


@register_kind
class QuantLinear(_PlainKind, QuantLayer):
    kind = "linear"
    float_type = nn.Linear

    def __init__(self, original: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        super().__init__(original, weight_spec, input_spec)
        self.in_features, self.out_features = original.in_features, original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen={self.frozen}"


@register_kind
class QuantConv2d(_PlainKind, QuantLayer):
    kind = "conv2d"
    float_type = nn.Conv2d

    def __init__(self, original: nn.Conv2d, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        if original.padding_mode != "zeros":
            raise ValueError(f"padding_mode '{original.padding_mode}' is not supported for quantization")
        super().__init__(original, weight_spec, input_spec)
        self.in_channels, self.out_channels = original.in_channels, original.out_channels
        self.kernel_size, self.stride, self.padding = original.kernel_size, original.stride, original.padding
        self.dilation, self.groups = original.dilation, original.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight()
        return F.conv2d(
            self.quantize_input(x), weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"frozen={self.frozen}"
        )


@register_kind
class SplitQuantConv2d(LayerKind, nn.Module):
    """Q-Diffusion's split-shortcut quantization of a conv fed by a concatenation [deep, skip].

    The two input halves are bimodal, so each gets its own activation quantizer and its own weight
    quantizer on the matching input-channel slice; conv(x, W) = conv(x_low, W_low) + conv(x_high, W_high).
    Each half is an ordinary `QuantConv2d` (`low`, `high`), so freezing, saving and export need nothing new;
    formats without a split (GGUF, diffusers) get the halves joined again (`weight_pieces`).
    """

    kind = "conv2d-split"
    float_type = nn.Conv2d

    def __init__(
        self, original: nn.Conv2d, split: int, weight_spec: QuantSpec | None, input_spec: QuantSpec | None
    ) -> None:
        super().__init__()
        if original.groups != 1 or not 0 < split < original.in_channels:
            raise ValueError(f"cannot split a conv with {original.in_channels} inputs at {split}")
        self.split = split

        def half(weight: torch.Tensor, bias: torch.Tensor | None) -> QuantConv2d:
            conv = nn.Conv2d(
                weight.shape[1],
                original.out_channels,
                original.kernel_size,
                original.stride,
                original.padding,
                original.dilation,
                bias=bias is not None,
            )
            conv.weight = nn.Parameter(weight.detach().clone())
            if bias is not None:
                conv.bias = original.bias
            return QuantConv2d(conv, weight_spec, input_spec)

        self.low = half(original.weight[:, :split], original.bias)
        self.high = half(original.weight[:, split:], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x[:, : self.split]) + self.high(x[:, self.split :])

    # layer kind -----------------------------------------------------------------------------------
    @classmethod
    def wants(cls, plan) -> bool:
        return plan.split > 0

    @classmethod
    def from_plan(cls, original: nn.Conv2d, plan) -> SplitQuantConv2d:
        return cls(original, plan.split, plan.weight, plan.input)

    def plan_fields(self) -> dict:
        return {"split": self.split}

    @classmethod
    def read_plan_fields(cls, entry: dict) -> dict:
        return {"split": entry["split"]} if entry.get("split") else {}

    def quantized_parts(self) -> dict[str, QuantLayer]:
        return {"low": self.low, "high": self.high}  # the halves, reconstructed as one unit


def wrap_layer(module: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> QuantLayer:
    """The quantized counterpart of an nn.Linear or nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return QuantLinear(module, weight_spec, input_spec)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, weight_spec, input_spec)
    raise TypeError(f"cannot quantize {type(module).__name__}")
