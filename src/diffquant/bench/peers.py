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

from diffquant.calibration import flatten_conditioning, unflatten_conditioning
from diffquant.errors import DiffquantError
from diffquant.families import adapter_for, denoise

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
            denoise(model, x, t, kwargs)  # by keyword: SD3's second positional input is not the timestep


def _state_dict_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if v is not None}, buffer)
    return len(buffer.getvalue()) / 1e6


class Peer(ABC):
    name = "peer"
    package = ""
    settings: tuple[str, ...] = ()
    missing: dict[str, str] = {}
    """Why a setting outside `settings` cannot run here (shown in the skipped row)."""

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
    missing = {"W4A4": "quanto quantizes activations to qint8 or float8 only (no 4-bit activations)"}

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
    missing = {"W4A4": "torchao's 4-bit-activation configs (int4 dynamic, NVFP4/MX) run on CUDA kernels only"}

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
    missing = {
        "W4A4": "ModelOpt's W4A4 configs (NVFP4_DEFAULT_CFG, NVFP4_SVDQUANT_DEFAULT_CFG) fail on CPU: "
        "'amax must be a CUDA tensor for dynamic block quantization'"
    }

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


class _Positional(nn.Module):
    """The denoiser behind a positional (sample, float timestep, *conditioning tensors) signature for
    torch.export. PT2E's X86 quantizer annotates ops fed by an int64 timestep and fails; a float one avoids it."""

    def __init__(self, denoiser: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.denoiser, self.keys, self.adapter = denoiser, keys, adapter_for(denoiser)

    def forward(self, x, t, *values):
        conditioning = unflatten_conditioning(dict(zip(self.keys, values, strict=True)))
        # t as calibration data holds it (the scheduler's); the family may want it scaled (Flux: t / 1000)
        timestep = t * self.adapter.timestep_scale
        kwargs = {self.adapter.sample_arg: x, self.adapter.timestep_arg: timestep, **conditioning}
        kwargs.update(self.adapter.extra_inputs(self.denoiser, x, conditioning))
        if self.adapter.takes_return_dict:
            kwargs["return_dict"] = False
        output = self.denoiser(**kwargs)
        return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


class _KeywordGraph(nn.Module):
    """An exported graph behind the float denoiser's keyword call (as families and pipelines call it);
    `inner` (the float model) tells adapters and pipelines which family and config it has."""

    def __init__(self, graph: Callable, inner: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.graph, self.inner, self.keys = graph, inner, keys
        self.adapter = adapter_for(inner)

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, *args, return_dict: bool = True, **kwargs):
        positional = (self.adapter.sample_arg, self.adapter.timestep_arg)[: len(args)]
        named = dict(zip(positional, args, strict=True)) | kwargs
        x, t = named[self.adapter.sample_arg], named[self.adapter.timestep_arg]
        t = t.float().expand(x.shape[0]) if t.ndim == 0 else t.float()
        t = t / self.adapter.timestep_scale  # the caller passed the family's scaled timestep; the graph scales it
        flat = flatten_conditioning({k: v for k, v in named.items() if k.split(".")[0] in _roots(self.keys)})
        output = self.graph(x, t, *(flat[key] for key in self.keys))
        return (output,) if not return_dict else SimpleNamespace(sample=output)


def _roots(keys: tuple[str, ...]) -> set[str]:
    return {key.split(".")[0] for key in keys}


class PT2E(Peer):
    name, package = "pt2e", "torchao"
    settings = ("W8A8",)
    missing = {"W4A4": "X86InductorQuantizer annotates int8 only"}

    def quantize(self, denoiser, setting, batches):
        import torch._inductor.config as inductor_config
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        x, t, kwargs = batches[0]
        keys = tuple(sorted(flatten_conditioning(kwargs)))
        example = (x, t.float(), *(flatten_conditioning(kwargs)[key] for key in keys))
        # AUTO batch: a named Dim trips a guard that diffusers' UNet adds when the batch equals its
        # channel count (64 <= batch); AUTO accepts the guard and the graph serves batches >= the example's
        batch = {0: torch.export.Dim.AUTO}
        # forward(x, t, *values): export sees the values as one (tuple) input, absent when there are none
        shapes = (batch, batch) + ((tuple(batch for _ in keys),) if keys else ())
        graph = torch.export.export(_Positional(copy.deepcopy(denoiser), keys), example, dynamic_shapes=shapes).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for x, t, kwargs in batches:
                prepared(x, t.float(), *(flatten_conditioning(kwargs)[key] for key in keys))
        converted = convert_pt2e(prepared)
        allow_exported_model_train_eval(converted)  # samplers call .eval() on the denoiser
        buffer = io.BytesIO()
        flat = tuple(batch for _ in example)  # the exported graph takes the values as inputs of their own
        torch.export.save(torch.export.export(converted, example, dynamic_shapes=flat), buffer)
        inductor_config.freezing = True  # prepacks the int8 weights for oneDNN: the real-kernel path
        try:
            compiled = torch.compile(converted)
            with torch.no_grad():
                compiled(*example)
        finally:
            inductor_config.freezing = False
        return PeerModel(
            _KeywordGraph(compiled, denoiser, keys),
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
