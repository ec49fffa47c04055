"""The inductor backend: CPU int8 on oneDNN, lowered by inductor's quantization passes as for PT2E.

The same layers as `onednn` run on int8 (<= 8-bit per-channel weights with integer zero-points, static
per-tensor <= 8-bit inputs, per-step grids included), but written in PT2E's reference form
(`kernels_inductor.py`): compiled with inductor freezing, inductor prepacks the weights and emits the
same oneDNN calls and fusions as for a PT2E-converted model, with no Python wrapper per GEMM. Its speed
needs `compile=True` (the graph is compiled with freezing, the per-step clock passed in as an input);
uncompiled it is a float simulation of the int8 GEMMs.
"""

from __future__ import annotations

from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from diffquant.modules.layers import QuantLayer
from diffquant.runtime.backends.base import DEFAULT_WEIGHT_ONLY_MODE, register_backend
from diffquant.runtime.backends.onednn import OneDNNBackend
from diffquant.runtime.kernels import OneDNNInt8Conv2d, SigmoidFormGELU
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
        for name, module in list(model.named_modules()):
            if not isinstance(module, GELU) or not isinstance(module.proj, InductorInt8Linear):
                continue
            if module.proj.input_sum_weight is None:
                replacement = DecomposedGELU(module.proj, module.approximate)
            elif module.approximate == "tanh":  # after the weight-shift correction: no post-op, the cheap form
                replacement = SigmoidFormGELU(module.proj)
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        for module in model.modules():  # FeedForward: the GELU projection writes the next GEMM's uint8 codes
            if isinstance(module, FeedForward):
                layers = [m for m in module.net if not isinstance(m, nn.Dropout)]  # dropout: identity in eval
                for producer, consumer in zip(layers, layers[1:], strict=False):
                    gemm = producer.proj if isinstance(producer, DecomposedGELU) else producer
                    foldable = isinstance(gemm, InductorInt8Linear) and gemm.input_sum_weight is None
                    if foldable and isinstance(consumer, InductorInt8Linear):
                        consumer.requantize_in_producer()
