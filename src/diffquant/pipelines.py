"""diffusers pipelines: calibration recorded by running the pipeline itself, quantized components, and
a directory that keeps the diffusers layout for every untouched component.

A pipeline becomes a `DiffusionModel` whose `denoiser` is its UNet or transformer and whose `pipeline`
is the pipeline; `quantize` swaps the quantized denoiser into it. On disk:

    model_index.json            diffusers' own (loads the untouched components as usual)
    scheduler/ vae/ text_encoder/ tokenizer/ ...   written by each component's save_pretrained
    transformer/ (or unet/)     a diffquant quantized directory (packed weights + quantization.json)
    text_encoder/ (optional)    weight-only quantized: its config.json + quantized_component.json + packed weights
    diffquant_pipeline.json     which components are quantized, and what the pipeline generates
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file, save_file

from diffquant.calibration import AllSteps, CalibrationSet, record_trajectories
from diffquant.engines import prepare_model
from diffquant.errors import ConfigError, DiffquantError
from diffquant.families import adapter_for
from diffquant.fileio import atomic_directory, write_json
from diffquant.model import METADATA_FILE, DiffusionModel, ModelInfo
from diffquant.modules import LayerPolicy, quant_layers
from diffquant.modules.surgery import export_plans, import_plans
from diffquant.quant import QuantSpec, pack_codes, unpack_codes
from diffquant.runtime.storage import load_quantized, save_quantized
from diffquant.sampling import SamplerConfig
from diffquant.sampling.pipeline import DENOISER_COMPONENTS, denoiser_component, pipeline_of, sample_pipeline

PIPELINE_FILE = "diffquant_pipeline.json"
COMPONENT_FILE = "quantized_component.json"
COMPONENT_TENSORS = "quantized_component.safetensors"


def is_pipeline(value: Any) -> bool:
    return isinstance(value, diffusers.DiffusionPipeline)


def model_from_pipeline(pipeline: Any, name: str | None = None, info: ModelInfo | None = None) -> DiffusionModel:
    """A pipeline as a DiffusionModel: its denoiser, its scheduler's config, and the pipeline itself.

    `info` (what the pipeline generates, e.g. a reference pipeline's class prompts) defaults to what the
    denoiser's family adapter reads from its config.
    """
    denoiser = getattr(pipeline, denoiser_component(pipeline))
    adapter = adapter_for(denoiser)
    info = info or ModelInfo(
        name=name or type(pipeline).__name__,
        architecture=type(denoiser).__name__,
        image_shape=adapter.latent_shape(denoiser.config),
        guidance_scale=_default_guidance(pipeline),
        dataset="",
    )
    # the class name travels with the config, so the schedule rebuilds as the pipeline's own scheduler
    schedule = {"_class_name": type(pipeline.scheduler).__name__, **dict(pipeline.scheduler.config)}
    return DiffusionModel(denoiser, info, schedule, None, None, pipeline)


def _default_guidance(pipeline: Any) -> float:
    """The guidance scale the pipeline's own __call__ defaults to (SD3: 7.0); 1.0 (none) if it has none."""
    parameter = inspect.signature(type(pipeline).__call__).parameters.get("guidance_scale")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) else 1.0


def generate(
    model: DiffusionModel, prompts: Sequence[str], steps: int = 20, guidance_scale: float | None = None, seed: int = 0
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] from the model's pipeline; the same seed and prompts give the same images."""
    config = SamplerConfig(steps=steps, guidance_scale=guidance_scale)
    result = sample_pipeline(model, len(prompts), config, seed, batch_size=len(prompts), prompts=list(prompts))
    return (result.images + 1.0) / 2.0


def record_pipeline_calibration(
    model: DiffusionModel,
    prompts: Sequence[str] | str | Path,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 1234,
    progress: bool = False,
) -> CalibrationSet:
    """Run the pipeline (its scheduler, its text encoders, both CFG branches) on `prompts` - a list or a
    file with one prompt per line - and keep every denoiser input as calibration data."""
    prompts = read_prompts(prompts)
    sampler = SamplerConfig(steps=steps, guidance_scale=guidance_scale)
    calibration = record_trajectories(
        model, len(prompts), sampler, AllSteps(), seed, batch_size=64, progress=progress, prompts=prompts
    )
    calibration.meta.update(scheduler=type(model.pipeline.scheduler).__name__, prompts=len(prompts), source="pipeline")
    return calibration


def read_prompts(prompts: Sequence[str] | str | Path) -> list[str]:
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"Prompt file {path} does not exist; pass a list of prompts or a file, one per line.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("Give at least one prompt (a list of strings, or a file with one prompt per line).")
    return prompts


def with_denoiser(model: DiffusionModel, quantized: DiffusionModel) -> DiffusionModel:
    """`quantized` (a quantized copy of model's denoiser) placed into a copy of model's pipeline."""
    pipeline = pipeline_of(model)
    components = dict(pipeline.components)
    components[denoiser_component(pipeline)] = quantized.denoiser
    quantized.pipeline = type(pipeline)(**components)
    return quantized


def save_pipeline(model: DiffusionModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized pipeline: untouched components in diffusers' layout, the denoiser quantized."""
    pipeline = pipeline_of(model)
    if model.quantization is None:
        raise DiffquantError("save() writes quantized pipelines; quantize the pipeline first.")
    quantized_name = denoiser_component(pipeline)
    extra = list((model.quantization or {}).get("components", {}))
    directory = Path(directory)
    with atomic_directory(directory, PIPELINE_FILE, overwrite) as scratch:
        for name, component in pipeline.components.items():
            if component is None or name == quantized_name:
                continue
            if name in extra:
                _save_component(component, scratch / name)
            else:
                component.save_pretrained(scratch / name)
        save_quantized(model, scratch / quantized_name)
        index = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in pipeline.config.items()}
        index["_class_name"] = type(pipeline).__name__
        write_json(scratch / "model_index.json", index)
        record = {"quantized_components": [quantized_name], "weight_only_components": extra}
        write_json(scratch / PIPELINE_FILE, {**record, "info": model.info.to_json()})
    return directory


def quantize_component(pipeline: Any, name: str, wbits: int) -> dict[str, Any]:
    """Round-to-nearest per-channel weight-only quantization of a pipeline component (e.g. a text encoder:
    its activations are token embeddings, calibrated by nothing diffquant records, so they stay in float)."""
    component = getattr(pipeline, name, None)
    if not isinstance(component, torch.nn.Module) or name in DENOISER_COMPONENTS:
        modules = [k for k, v in pipeline.components.items() if isinstance(v, torch.nn.Module)]
        raise ConfigError(f"'{name}' is not a quantizable extra component; choose from: {', '.join(modules)}.")
    prepare_model(component, LayerPolicy(weight=QuantSpec(f"int{wbits}", granularity="per_channel"), activation=None))
    for _, layer in quant_layers(component):
        layer.freeze()
    return {"wbits": wbits, "layers": sum(1 for _ in quant_layers(component))}


def _save_component(component: torch.nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True)
    component.config.save_pretrained(directory)
    tensors, packed = {}, {}
    layers = dict(quant_layers(component))
    for key, value in component.state_dict().items():
        if key.endswith(".weight_codes"):
            bits = layers[key.removesuffix(".weight_codes")].weight_quantizer.spec.bits
            tensors[key + ".packed"] = pack_codes(value.to(torch.int64), bits)
            packed[key] = {"bits": bits, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[1]}
        else:
            tensors[key] = value.detach().contiguous()
    save_file(tensors, str(directory / COMPONENT_TENSORS))
    record = {"class": type(component).__name__, "structure": export_plans(component), "packed": packed}
    write_json(directory / COMPONENT_FILE, record)


def _load_component(directory: Path) -> torch.nn.Module:
    import transformers  # text encoders of diffusers pipelines (the `pipelines` extra)

    record = json.loads((directory / COMPONENT_FILE).read_text())
    component_class = getattr(transformers, record["class"], None) or getattr(diffusers, record["class"], None)
    if component_class is None:
        raise DiffquantError(f"{directory}/{COMPONENT_FILE} names an unknown class '{record['class']}'.")
    component = component_class(component_class.config_class.from_pretrained(directory))
    import_plans(component, record["structure"])
    tensors = load_file(str(directory / COMPONENT_TENSORS))
    for key, entry in record["packed"].items():
        count = int(torch.tensor(entry["shape"]).prod())
        codes = unpack_codes(tensors.pop(key + ".packed"), entry["bits"], count).reshape(entry["shape"])
        tensors[key] = codes.to(getattr(torch, entry["dtype"]))
    component.load_state_dict(tensors, strict=True)
    return component.eval()


def is_pipeline_directory(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_pipeline(directory: str | Path) -> DiffusionModel:
    """A pipeline directory (float, or quantized by `save_pipeline`) as a DiffusionModel, in one call."""
    directory = Path(directory)
    index = json.loads((directory / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_class is None:
        named = index.get("_class_name")
        raise DiffquantError(f"{directory}/model_index.json names '{named}', which is not a diffusers pipeline.")
    marker = directory / PIPELINE_FILE
    record = json.loads(marker.read_text()) if marker.is_file() else {"quantized_components": []}
    quantized = {name: load_quantized(directory / name) for name in record["quantized_components"]}
    given = {k: m.denoiser for k, m in quantized.items()}
    given.update({name: _load_component(directory / name) for name in record.get("weight_only_components", [])})
    missing = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipeline = pipeline_class.from_pretrained(directory, **missing, **given)
    name = denoiser_component(pipeline)
    if name in quantized:
        model = quantized[name]
        model.pipeline, model.path = pipeline, directory
        return model
    model = model_from_pipeline(pipeline, directory.name, _stored_info(directory, record))
    model.path = directory
    return model


def _stored_info(directory: Path, record: dict[str, Any]) -> ModelInfo | None:
    """What a float pipeline directory says it generates (diffquant.json), if it says anything."""
    payload = record.get("info")
    metadata = directory / METADATA_FILE
    if payload is None and metadata.is_file():
        try:
            payload = json.loads(metadata.read_text())
        except json.JSONDecodeError as error:
            raise DiffquantError(f"{metadata} is not valid JSON ({error}); restore it.") from error
    if payload is None:
        return None
    try:
        return ModelInfo.from_json(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DiffquantError(
            f"{directory}: its model description is not valid ({error!r}); restore {METADATA_FILE}."
        ) from error
