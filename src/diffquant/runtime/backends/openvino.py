"""The openvino backend: the whole denoiser converted with OpenVINO and run on its CPU runtime.

Layers with <= 8-bit per-channel integer weights and one static per-tensor <= 8-bit input grid are
written in the form OpenVINO's low-precision passes run on int8 (`kernels_openvino.py`): our method's
calibrated grids, OpenVINO's int8 kernels and fusions. Weight-only layers keep their integer codes
(OpenVINO decompresses them inside its GEMM); what is left (dynamic or per-token grids, attention
matmuls a method quantized) runs as the simulation's float ops inside the OpenVINO graph. OpenVINO
compiles the graph itself, once per input signature (shapes), on the first call with it; the
compute dtype becomes its inference precision hint (`bfloat16`: the float ops in bf16). `compile` and
`weight_only_mode` do not apply (OpenVINO compiles, and decompresses integer weights in its GEMMs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.modules.attention import QuantAttnProcessor
from diffquant.modules.layers import QuantLayer
from diffquant.runtime.backends.base import DEFAULT_WEIGHT_ONLY_MODE, Backend, register_backend
from diffquant.runtime.kernels import DequantizedLayer, input_supported, weight_supported
from diffquant.runtime.kernels_openvino import (
    PRECISION_HINTS,
    OpenVINOAttention,
    OpenVINODenoiser,
    OpenVINOFakeQuantize,
    OpenVINOInt8Conv2d,
    OpenVINOInt8Linear,
    OpenVINOWeightOnly,
    int8_weight_bytes,
    integral_zero_point,
    step_graph_count,
    tensor_argument_names,
    tensor_arguments,
)

OPENVINO_IR = "openvino/denoiser.xml"
"""Where an exported directory holds the graph as OpenVINO IR."""

OPENVINO_KERNELS: dict[str, type[nn.Module]] = {"linear": OpenVINOInt8Linear, "conv2d": OpenVINOInt8Conv2d}
"""Layer kind -> its int8 form for OpenVINO."""


@register_backend
class OpenVINOBackend(Backend):
    name = "openvino"
    runs_graph: ClassVar[bool] = True
    integer_attention = False  # OpenVINO fuses attention itself

    def check_available(self) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError as error:
            raise DiffquantError(
                f"The openvino backend needs OpenVINO ({error}); pip install 'diffquant[openvino]', "
                "or use --backend onednn."
            ) from error

    def supports(self, layer: QuantLayer) -> bool:
        return layer.kind in OPENVINO_KERNELS

    def convert(self, layer: QuantLayer, weight_only_mode: str = DEFAULT_WEIGHT_ONLY_MODE) -> nn.Module:
        quantizer = layer.input_quantizer
        if not weight_supported(layer):
            return DequantizedLayer(layer)
        if quantizer is None or not quantizer.enabled:
            return OpenVINOWeightOnly(layer)
        if input_supported(quantizer) and integral_zero_point(quantizer):
            return OPENVINO_KERNELS[layer.kind](layer)
        return DequantizedLayer(layer)

    def finish(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, QuantAttnProcessor) and module._active():
                _attention_for_openvino(module)
        _check_step_graphs_fit(model)

    def wrap(self, model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
        return OpenVINODenoiser(model, PRECISION_HINTS[compute_dtype])

    written_files = ("openvino",)

    def write_files(self, denoiser: nn.Module, calls: list[dict[str, Any]], directory: Path) -> dict[str, Any]:
        """The graph as OpenVINO IR (`OPENVINO_IR` + .bin), every input dimension left open, inputs named
        as the model's arguments; compiled by plain OpenVINO and checked against the deployed model on
        the other probe calls (another batch size): dimensions a model fixes while tracing show there."""
        import openvino as ov

        runner = denoiser.inner  # DeployedDenoiser -> OpenVINODenoiser
        steps = step_graph_count(runner.inner)
        if steps > 1:  # each step's grids are constants of its own graph: no single IR holds them all
            reason = f"per-step grids ({steps} steps, one graph each): the model runs through diffquant only"
            return {"openvino_ir": {"path": None, "not_written": reason}}
        first, *others = calls
        model = runner.openvino_model(dynamic=True, **first)
        names = tensor_argument_names(first)
        for port, name in zip(model.inputs, names, strict=True):  # OpenVINO callers feed inputs by these names
            port.get_tensor().set_names({name})
        path = directory / OPENVINO_IR
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, path)
        record: dict[str, Any] = {"path": OPENVINO_IR, "inputs": names, "precision_hint": runner.precision}
        graph = ov.Core().compile_model(str(path), "CPU", runner.compile_properties())
        for call in others:
            batch = next(iter(v for v in call.values() if isinstance(v, torch.Tensor))).shape[0]
            try:
                plain = graph(dict(zip(names, tensor_arguments(call), strict=True)))[0]
            except Exception as error:  # noqa: BLE001 - recorded: the IR then runs only at the probe's shapes
                record[f"batch_{batch}"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            with torch.no_grad():
                expected = runner(**call)
            expected = expected[0] if isinstance(expected, tuple) else expected
            error = (torch.from_numpy(plain) - expected).abs().max() / expected.abs().max()
            record[f"batch_{batch}_max_relative_error"] = float(error)
        return {"openvino_ir": record}


PER_STEP_GRAPH_BYTES = 4 << 30
"""Most int8 weight bytes the per-step graphs of one call signature may hold together: every graph keeps
its own copy of the weights (a per-step bank of 25 steps on a 600 M-parameter model would be 15 GB)."""


def _check_step_graphs_fit(model: nn.Module) -> None:
    steps = step_graph_count(model)
    if steps == 1:
        return
    weight_bytes = int8_weight_bytes(model)
    if steps * weight_bytes > PER_STEP_GRAPH_BYTES:
        raise DiffquantError(
            f"The openvino backend compiles one graph per step for per-step activation grids (TFMQ-DM, DGQ), "
            f"each with its own copy of the int8 weights: {steps} steps x {weight_bytes / 2**20:.0f} MB would "
            f"exceed {PER_STEP_GRAPH_BYTES >> 30} GB. Use --backend onednn or inductor, or quantize with "
            "activation_per_step=False."
        )


def _attention_for_openvino(processor: QuantAttnProcessor) -> None:
    """Quantized attention operands as FakeQuantize, on zero-point-free ranges (`OpenVINOAttention`), which
    OpenVINO folds into its int8 attention; with float probabilities the attention itself stays PyTorch's
    fused SDPA, which OpenVINO maps to its own."""
    for name in ("query_quantizer", "key_quantizer", "value_quantizer", "probs_quantizer"):
        quantizer = getattr(processor, name)
        if quantizer is not None and input_supported(quantizer) and integral_zero_point(quantizer):
            setattr(processor, name, OpenVINOFakeQuantize(quantizer))
    processor.deployed_attention = OpenVINOAttention(processor)
