"""The smoothed low-rank layer kind (SVDQuant, Li et al. 2025): y = Q(x_t) Q(R)^T + x_t D^T U^T.

With x_t = (x / s) H - the input divided by per-channel smoothing scales s and optionally rotated by an
orthogonal Hadamard H - and W_t = (W diag(s)) H the weight transformed the same way, the layer keeps
a 16-bit low-rank branch U D (rank r, from the SVD of W_t) beside the quantized residual R = W_t - U D.
Without quantizers the output equals the float layer's for every s, H and r.

The residual is an ordinary `QuantLinear`/`QuantConv2d` child (`residual`), so freezing, packing,
saving and runtime export treat it like any other layer; the container adds the input transform and
the branch, which runs as a real float matmul after export.

The same kind carries a user's LoRA on a quantized model: `add_lora(down, up, scale)` maps the
adapter into the transformed input space (D' = down diag(s) H) and concatenates it to the branch, as
Nunchaku does, without touching the quantized residual.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.modules.kinds import LayerKind, register_kind
from diffquant.modules.layers import QuantLayer, wrap_layer
from diffquant.quant import QuantSpec
from diffquant.quant.lowrank import low_rank_split
from diffquant.quant.rotation import rotate_input, rotate_weight, rotation_matrix


def transform_weight(weight: torch.Tensor, smooth: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """W diag(s) H on the input-channel axis (what the layer's transformed input x_t multiplies)."""
    shape = (1, -1) + (1,) * (weight.ndim - 2)
    scaled = weight * smooth.reshape(shape).to(weight.dtype)
    return rotate_weight(scaled, rotation) if rotation is not None else scaled


BRANCH_DTYPE = torch.float16
"""The low-rank branch's storage precision (SVDQuant keeps it in 16 bits); it runs in float32."""
BRANCH_SUFFIXES = (".lora_up", ".lora_down")


def branch_precision(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to the branch's 16-bit storage precision, kept in float32."""
    return tensor.to(BRANCH_DTYPE).float()


@register_kind
class LowRankQuantLayer(LayerKind, nn.Module):
    """A linear or conv layer as smoothing/rotation + quantized residual + 16-bit low-rank branch."""

    kind = "lowrank"

    def __init__(
        self,
        original: nn.Linear | nn.Conv2d,
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
        rank: int = 0,
        rotate: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(original, nn.Conv2d) and original.groups != 1:
            raise ConfigError("The low-rank layer kind needs a conv with groups=1; keep grouped convs plain.")
        weight = original.weight.detach()
        if rank < 0 or rank > min(weight.shape[0], weight[0].numel()):
            raise ConfigError(f"rank must be between 0 and {min(weight.shape[0], weight[0].numel())}, got {rank}.")
        self.is_conv = isinstance(original, nn.Conv2d)
        # the branch's conv geometry lives here: runtime export swaps `residual` for a kernel module
        self.conv_args = (original.stride, original.padding, original.dilation) if self.is_conv else ()
        self.in_channels = weight.shape[1]
        residual = copy.deepcopy(original)
        self.residual: QuantLayer = wrap_layer(residual, weight_spec, input_spec)
        self.register_buffer("smooth", torch.ones(self.in_channels))
        # a fixed function of the channel count: rebuilt from the plan on load, never written to disk
        self.register_buffer("rotation", rotation_matrix(self.in_channels) if rotate else None, persistent=False)
        # an empty branch of the right shape: `decompose` fills it (loading a saved model overwrites it)
        self.lora_down = nn.Parameter(torch.zeros(rank, *weight.shape[1:]), requires_grad=False)
        self.lora_up = nn.Parameter(torch.zeros(weight.shape[0], rank), requires_grad=False)
        if rotate:  # the residual multiplies the rotated input
            self.residual.weight = nn.Parameter(transform_weight(weight, self.smooth, self.rotation))

    @property
    def rank(self) -> int:
        return self.lora_up.shape[1]

    @property
    def rotate(self) -> bool:
        return self.rotation is not None

    # building -----------------------------------------------------------------------------------
    def decompose(self, weight: torch.Tensor, smooth: torch.Tensor | None = None, rank: int | None = None) -> None:
        """Set smoothing scales and a rank-r SVD branch from the float `weight`; the residual gets the rest.

        The weight quantizer is recalibrated on the new residual.
        """
        if self.residual.frozen:
            raise DiffquantError("This low-rank layer is frozen (its residual holds codes); decompose before freeze.")
        rank = self.rank if rank is None else rank
        if smooth is not None:
            if smooth.shape != (self.in_channels,) or not torch.all(smooth > 0):
                raise ConfigError(f"smooth must hold {self.in_channels} positive scales.")
            self.smooth = smooth.detach().float().clone()
        transformed = transform_weight(weight.detach().float(), self.smooth, self.rotation)
        if rank:  # the branch is a 16-bit one: round it here so the file and the simulation agree exactly
            up, down = (branch_precision(t) for t in low_rank_split(transformed, rank))
        else:
            up, down = torch.zeros(weight.shape[0], 0), torch.zeros(0, *weight.shape[1:])
        self.lora_up = nn.Parameter(up, requires_grad=False)
        self.lora_down = nn.Parameter(down, requires_grad=False)
        residual = transformed - (up @ down.reshape(rank, transformed[0].numel())).reshape(transformed.shape)
        self.residual.weight = nn.Parameter(residual.to(weight.dtype))
        self.residual.calibrate_weight()

    def add_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> None:
        """Add a LoRA delta `scale * up @ down` (down: (r, in, ...) on the original input) to the branch."""
        if down.shape[1:] != self.lora_down.shape[1:] or up.shape != (self.lora_up.shape[0], down.shape[0]):
            raise ConfigError(
                f"LoRA shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit this layer "
                f"(down: (r, {', '.join(map(str, self.lora_down.shape[1:]))}), up: ({self.lora_up.shape[0]}, r))."
            )
        mapped = transform_weight(down.detach().float(), self.smooth, self.rotation)
        self.lora_down = nn.Parameter(torch.cat([self.lora_down.detach(), mapped]), requires_grad=False)
        scaled_up = scale * up.detach().float()
        self.lora_up = nn.Parameter(torch.cat([self.lora_up.detach(), scaled_up], 1), requires_grad=False)

    # reconstruction ---------------------------------------------------------------------------------
    def trainable_float_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up, self.lora_down] if self.rank else []

    def finish_float_training(self) -> None:
        # the branch is stored in 16 bits: the simulation must run what the file will hold
        with torch.no_grad():
            for parameter in (self.lora_up, self.lora_down):
                parameter.copy_(branch_precision(parameter))

    # running ------------------------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_t = (x / s) H along the channel axis."""
        axis = 1 if self.is_conv else x.ndim - 1
        shape = [1] * x.ndim
        shape[axis] = -1
        x = x / self.smooth.reshape(shape).to(x.dtype)
        return rotate_input(x, self.rotation, axis) if self.rotation is not None else x

    def branch(self, x_t: torch.Tensor) -> torch.Tensor:
        """The 16-bit low-rank path x_t D^T U^T (a conv with the residual's geometry, then a 1x1 conv)."""
        if self.is_conv:
            hidden = F.conv2d(x_t, self.lora_down, None, *self.conv_args)
            return F.conv2d(hidden, self.lora_up[:, :, None, None])
        return F.linear(F.linear(x_t, self.lora_down), self.lora_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.transform_input(x)
        out = self.residual(x_t)
        return out + self.branch(x_t) if self.rank else out

    # runtime export -------------------------------------------------------------------------------
    def float_paths(self) -> dict[str, str]:
        """The input transform and the branch stay float beside whatever kernel runs the residual."""
        dtype = str(self.smooth.dtype).removeprefix("torch.")
        transform = f"{dtype} smoothing divide" + (f" + {dtype} Hadamard matmul" if self.rotate else "")
        paths = {"input transform": transform}
        if self.rank:
            dtype = str(self.lora_up.dtype).removeprefix("torch.")
            paths["branch"] = f"{dtype} {'conv + 1x1 conv' if self.is_conv else 'matmul'}"
        return paths

    # layer kind -----------------------------------------------------------------------------------
    @property
    def float_type(self) -> type[nn.Module]:
        return nn.Conv2d if self.is_conv else nn.Linear

    @classmethod
    def wants(cls, plan) -> bool:
        return plan.lowrank is not None

    @classmethod
    def from_plan(cls, original: nn.Linear | nn.Conv2d, plan) -> LowRankQuantLayer:
        return cls(original, plan.weight, plan.input, **plan.lowrank)

    def plan_fields(self) -> dict:
        return {"lowrank": {"rank": self.rank, "rotate": self.rotate}}

    @classmethod
    def read_plan_fields(cls, entry: dict) -> dict:
        return {"lowrank": entry["lowrank"]} if entry.get("lowrank") is not None else {}

    def quantized_parts(self) -> dict[str, QuantLayer]:
        return {"residual": self.residual}

    def weight_pieces(self) -> dict[str, QuantLayer]:
        return {}  # the float weight is the transformed residual plus the branch, no concatenation

    def joined_weight(self) -> torch.Tensor:
        """W = (Q(R) + U D) H^T diag(1/s): the float weight this layer computes with, undone from x_t."""
        transformed = self.residual.dequantized_weight().detach().float()
        if self.rank:
            branch = self.lora_up @ self.lora_down.reshape(self.rank, -1)
            transformed = transformed + branch.reshape(transformed.shape)
        scaled = rotate_weight(transformed, self.rotation.T) if self.rotation is not None else transformed
        shape = (1, -1) + (1,) * (scaled.ndim - 2)
        return scaled / self.smooth.reshape(shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, rotate={self.rotate}"
