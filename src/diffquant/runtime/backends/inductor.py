"""The inductor backend: CPU int8 on oneDNN, lowered by inductor's quantization passes as for PT2E.

The same layers as `onednn` run on int8 (<= 8-bit per-channel weights with integer zero-points, static
per-tensor <= 8-bit inputs, per-step grids included), but written in PT2E's reference form
(`kernels_inductor.py`): compiled with inductor freezing, inductor prepacks the weights and emits the
same oneDNN calls and fusions as for a PT2E-converted model, with no Python wrapper per GEMM. Its speed
needs `compile=True` (the graph is compiled with freezing, the per-step clock passed in as an input);
uncompiled it is a float simulation of the int8 GEMMs.
"""

from __future__ import annotations

from torch import nn

from diffquant.modules.layers import QuantLayer
from diffquant.runtime.backends.base import DEFAULT_WEIGHT_ONLY_MODE, register_backend
from diffquant.runtime.backends.onednn import OneDNNBackend, feedforward_gemm_pairs, fuse_gelus
from diffquant.runtime.kernels import OneDNNInt8Conv2d
from diffquant.runtime.kernels_inductor import DecomposedGELU, InductorInt8Conv2d, InductorInt8Linear

INDUCTOR_KERNELS = {"linear": InductorInt8Linear, "conv2d": InductorInt8Conv2d}
"""Layer kind -> int8 module in PT2E's reference form."""


@register_backend
class InductorBackend(OneDNNBackend):
    name = "inductor"
    freezes = True
    int8_kernels = INDUCTOR_KERNELS

    def convert(self, layer: QuantLayer, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
        converted = super().convert(layer, weight_only_mode)
        if isinstance(converted, InductorInt8Conv2d) and converted.input.per_step:
            # inductor matches convolutions only with a fixed input grid: a per-step one keeps our operator
            return OneDNNInt8Conv2d(layer)
        return converted

    def finish(self, model: nn.Module) -> None:
        """Write the graph in the forms inductor's fusion patterns match; the fusing is inductor's."""
        fuse_gelus(model, InductorInt8Linear, DecomposedGELU)
        for gemm, consumer in feedforward_gemm_pairs(model, DecomposedGELU):  # the GELU GEMM writes uint8 codes
            foldable = isinstance(gemm, InductorInt8Linear) and gemm.takes_epilogue
            if foldable and isinstance(consumer, InductorInt8Linear):
                consumer.requantize_in_producer()
