"""GPTQ (Frantar et al., ICLR 2023): round a layer's weights column by column, pushing each column's
rounding error onto the columns not yet rounded through the inverse Hessian H = 2 X^T X of the layer
input, so the layer *output* error stays small.

Paper defaults: damping 0.01 x mean(diag H), lazy batch updates in blocks of 128 columns, activation
order (columns with the largest diag H first). Scales and zero-points come from the layer's weight
quantizer, calibrated before GPTQ ("static groups"), so any grid (per-channel, group-g, NVFP4/MX,
integer or float) works and the result lies exactly on it: freezing afterwards reproduces it bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.modules.layers import QuantLayer
from diffquant.quant import fake_quantize, group_view, ungroup


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings (paper defaults)."""

    damping: float = 0.01
    """Added to diag(H) as a share of its mean, for a stable Cholesky factorisation."""
    block_size: int = 128
    """Columns per lazy batch update."""
    act_order: bool = True
    """Quantize columns in decreasing diag(H) order (the 'act-order' trick)."""

    def validate(self) -> None:
        if self.damping <= 0 or self.block_size <= 0:
            raise ConfigError("GPTQ damping and block_size must be positive.")


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the GEMM rows a layer sees (conv inputs unfolded to patches)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.hessian: torch.Tensor | None = None
        self.rows = 0

    def gemm_rows(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d) or issubclass(getattr(layer, "float_type", nn.Module), nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor) -> None:
        for part in x.detach().split(8):  # a few samples at a time: unfolded conv patches are large
            rows = self.gemm_rows(part).float()
            update = (rows.T @ rows).double()
            total = self.rows + rows.shape[0]
            if self.hessian is None:
                self.hessian = 2.0 * update / total
            else:
                self.hessian = self.hessian * (self.rows / total) + 2.0 * update / total
            self.rows = total


def _column_params(layer: QuantLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer's scale and zero-point expanded to one value per weight element, as (out, columns)."""
    quantizer = layer.weight_quantizer
    view = group_view(weight, quantizer.grouping)
    scale, zero_point = quantizer.current_params(view)
    full_scale = ungroup(scale.expand_as(view), weight.shape, quantizer.grouping)
    full_zero = ungroup(zero_point.expand_as(view), weight.shape, quantizer.grouping)
    return full_scale.reshape(weight.shape[0], -1), full_zero.reshape(weight.shape[0], -1)


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt, config: GPTQConfig
) -> torch.Tensor:
    """GPTQ on a (out, columns) weight with per-element scale/zero-point; returns the quantized weight."""
    config.validate()
    weight = weight.double().clone()
    hessian = hessian.double().clone()
    columns = weight.shape[1]
    dead = torch.diag(hessian) == 0  # inputs that are always zero: their weights do not matter
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    order = torch.argsort(torch.diag(hessian), descending=True) if config.act_order else torch.arange(columns)
    weight, scale, zero_point = weight[:, order], scale[:, order].double(), zero_point[:, order].double()
    hessian = hessian[order][:, order]
    hessian += torch.eye(columns, dtype=hessian.dtype) * config.damping * torch.diag(hessian).mean()
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        upper = torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as error:
        raise DiffquantError(
            f"GPTQ: the layer-input Hessian is not positive definite ({error}); raise damping."
        ) from error
    quantized = torch.zeros_like(weight)
    for start in range(0, columns, config.block_size):
        end = min(start + config.block_size, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            j = start + i
            q = fake_quantize(column[:, None], scale[:, j : j + 1], zero_point[:, j : j + 1], fmt)[:, 0]
            quantized[:, j] = q
            error = (column - q) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ upper[start:end, end:]
    return quantized[:, torch.argsort(order)]


def gptq_layer(layer: QuantLayer, hessian: torch.Tensor, config: GPTQConfig = GPTQConfig()) -> None:
    """Replace `layer`'s float weight by its GPTQ-rounded values (on the calibrated weight grid)."""
    if layer.weight_quantizer is None or layer.frozen:
        raise DiffquantError("GPTQ needs an unfrozen layer with a weight quantizer.")
    weight = layer.weight.detach()
    flat = weight.reshape(weight.shape[0], -1)
    if hessian.shape != (flat.shape[1], flat.shape[1]):
        raise DiffquantError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight of {tuple(weight.shape)}.")
    scale, zero_point = _column_params(layer, weight)
    quantized = gptq_round(flat, hessian, scale, zero_point, layer.weight_quantizer.fmt, config)
    layer.weight = nn.Parameter(quantized.to(weight.dtype).reshape(weight.shape))
