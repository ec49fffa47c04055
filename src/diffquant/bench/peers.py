"""Adapters for peer quantization libraries, run on our models with our calibration data.

Each adapter quantizes a copy of the full-precision denoiser the way its library documents, feeds
the same calibration inputs diffquant's naive PTQ uses, and returns a module with the diffusers
call signature. A library that is not installed (`pip install -e '.[peers]'`) is skipped with a note.
Working calls and pitfalls follow shared/docs/research/peers.md (quanto never quantizes conv inputs,
PT2E needs a float timestep, torchao is Linear-only).
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from diffquant.errors import DiffquantError

CalibrationBatches = list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class PeerModel:
    denoiser: nn.Module
    disk_mb: float
    coverage: str
    kernels: str
    compiled: bool = False


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _feed(model: nn.Module, batches: CalibrationBatches) -> None:
    with torch.no_grad():
        for x, t, kwargs in batches:
            model(x, t, **kwargs)


def _state_dict_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if v is not None}, buffer)
    return len(buffer.getvalue()) / 1e6


class Peer(ABC):
    name = "peer"
    package = ""
    settings: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """None when usable, else why not."""
        if _version(self.package) is None:
            return f"{self.package} is not installed (pip install -e '.[peers]')"
        return None

    def version(self) -> str:
        return _version(self.package) or "-"

    @abstractmethod
    def quantize(self, denoiser: nn.Module, setting: str, batches: CalibrationBatches) -> PeerModel:
        """Quantize a copy of `denoiser` at `setting`, calibrating on `batches`."""


class Quanto(Peer):
    name, package = "quanto", "optimum-quanto"
    settings = ("W8A8", "W4A8", "W4A16", "W8A16")

    def quantize(self, denoiser, setting, batches):
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantization_map, quantize
        from safetensors.torch import save_file

        weights = {"W8A8": qint8, "W4A8": qint4, "W4A16": qint4, "W8A16": qint8}[setting]
        activations = qint8 if setting.endswith("A8") else None
        model = copy.deepcopy(denoiser)
        quantize(model, weights=weights, activations=activations)
        if activations is not None:
            with Calibration(momentum=0.9):
                _feed(model, batches)
        freeze(model)
        with tempfile.TemporaryDirectory() as folder:
            # quanto's own save path: safetensors + quantization map (None tensors must be dropped)
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items() if v is not None}, f"{folder}/m.safetensors"
            )
            Path(f"{folder}/qmap.json").write_text(json.dumps(quantization_map(model)))
            disk = sum(f.stat().st_size for f in Path(folder).iterdir()) / 1e6
        coverage = "Linear+Conv2d weights; Linear inputs only (QConv2d never quantizes its input)"
        return PeerModel(
            model,
            disk,
            coverage if activations else "Linear+Conv2d weights",
            "int8 _int_mm for Linear W8A8; rest dequantized",
        )


class TorchAO(Peer):
    name, package = "torchao", "torchao"
    settings = ("W8A8", "W4A8", "W4A16", "W8A16")

    def quantize(self, denoiser, setting, batches):
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8DynamicActivationIntxWeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )

        configs = {
            "W8A8": Int8DynamicActivationInt8WeightConfig(),
            "W4A8": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
            "W4A16": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            "W8A16": Int8WeightOnlyConfig(),
        }
        model = copy.deepcopy(denoiser)
        quantize_(model, configs[setting])
        disk = _state_dict_mb(model)
        compiled = torch.compile(model)
        kernels = "int8 _int_mm (dynamic per-token)" if setting == "W8A8" else "dequantize + float matmul"
        return PeerModel(compiled, disk, "nn.Linear only (Conv2d left fp32); activations dynamic", kernels, True)


class ModelOpt(Peer):
    name, package = "modelopt", "nvidia-modelopt"
    settings = ("W8A8", "W4A8", "W4A16")

    def quantize(self, denoiser, setting, batches):
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
        from modelopt.torch.opt.config_loader import load_config
        from modelopt.torch.quantization.config import QuantizeConfig

        base = load_config("configs/ptq/presets/diffusers/int8", schema_type=QuantizeConfig).model_dump(
            exclude_unset=True
        )
        config = copy.deepcopy(base)
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and setting.startswith("W4"):
                entry["cfg"] = {"num_bits": 4, "axis": 0}
            if entry.get("quantizer_name") == "*input_quantizer" and setting.endswith("A16"):
                entry.pop("cfg", None)
                entry["enable"] = False
        model = mtq.quantize(copy.deepcopy(denoiser), config, lambda m: _feed(m, batches))
        with tempfile.TemporaryDirectory() as folder:
            mto.save(model, f"{folder}/mto.pt")
            disk = Path(f"{folder}/mto.pt").stat().st_size / 1e6
        return PeerModel(model, disk, "Linear+Conv2d, per-tensor static inputs (diffusers int8 preset)", "fake quant")


class _Tensor2Output(nn.Module):
    """An exported graph returning a tensor, behind the diffusers call signature (`.sample`)."""

    def __init__(self, graph: Callable, conditional: bool) -> None:
        super().__init__()
        self.graph, self.conditional = graph, conditional

    def forward(self, x, t, **kwargs):
        t = t.float().expand(x.shape[0]) if t.ndim == 0 else t.float()
        args = (x, t, kwargs["class_labels"]) if self.conditional else (x, t)
        return SimpleNamespace(sample=self.graph(*args))


class _FloatTimestep(nn.Module):
    """PT2E's X86 quantizer annotates ops fed by an int64 timestep and fails; a float one avoids it."""

    def __init__(self, denoiser: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.denoiser, self.conditional = denoiser, conditional

    def forward(self, x, t, labels=None):
        kwargs = {"class_labels": labels} if self.conditional else {}
        return self.denoiser(x, t, **kwargs).sample


class PT2E(Peer):
    name, package = "pt2e", "torchao"
    settings = ("W8A8",)

    def quantize(self, denoiser, setting, batches):
        import torch._inductor.config as inductor_config
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        conditional = "class_labels" in batches[0][2]
        x, t, kwargs = batches[0]
        example = (x, t.float()) + ((kwargs["class_labels"],) if conditional else ())
        # AUTO batch: a named Dim trips a guard that diffusers' UNet adds when the batch equals its
        # channel count (64 <= batch); AUTO accepts the guard and the graph serves batches >= the example's
        shapes = tuple({0: torch.export.Dim.AUTO} for _ in range(3 if conditional else 2))
        graph = torch.export.export(
            _FloatTimestep(copy.deepcopy(denoiser), conditional), example, dynamic_shapes=shapes
        ).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for x, t, kwargs in batches:
                prepared(x, t.float(), *((kwargs["class_labels"],) if conditional else ()))
        converted = convert_pt2e(prepared)
        allow_exported_model_train_eval(converted)  # samplers call .eval() on the denoiser
        buffer = io.BytesIO()
        torch.export.save(torch.export.export(converted, example, dynamic_shapes=shapes), buffer)
        inductor_config.freezing = True  # prepacks the int8 weights for oneDNN: the real-kernel path
        try:
            compiled = torch.compile(converted)
            with torch.no_grad():
                compiled(*example)
        finally:
            inductor_config.freezing = False
        return PeerModel(
            _Tensor2Output(compiled, conditional),
            len(buffer.getvalue()) / 1e6,
            "Linear+Conv2d, static per-tensor uint8 inputs (X86InductorQuantizer)",
            "oneDNN qconv/qlinear via torch.compile",
            True,
        )


PEERS: dict[str, Peer] = {peer.name: peer for peer in (Quanto(), TorchAO(), ModelOpt(), PT2E())}


def get_peer(name: str) -> Peer:
    if name not in PEERS:
        raise DiffquantError(f"Unknown peer '{name}'. Peers: {', '.join(PEERS)}.")
    return PEERS[name]
