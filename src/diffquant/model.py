"""The model type every layer passes around, and float model directories on disk.

This is a bottom-layer module: it imports only diffusers, the family adapters and file helpers, so
calibration, engines, runtime and evaluation can all use it without importing the zoo.

A model directory is what diffusers' `save_pretrained` writes (config.json + safetensors) plus
`scheduler/scheduler_config.json` (the training noise schedule) and `diffquant.json` (what the model
generates: latent shape, classes, default guidance scale).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.families import FamilyAdapter, adapter_for
from diffquant.fileio import atomic_directory, write_json

METADATA_FILE = "diffquant.json"
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"

# DDPM's linear beta schedule (Ho et al. 2020), as diffusers' DDPMScheduler names it.
DDPM_LINEAR_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


@dataclass(frozen=True)
class ModelInfo:
    """What a diffusion model generates and how to sample it by default.

    `image_shape` is the shape of one unpacked denoiser input: (C, H, W) in pixel or latent space,
    (C, F, H, W) for video; a family adapter packs it where the denoiser wants tokens (Flux).
    """

    name: str
    architecture: str
    image_shape: tuple[int, ...]
    num_classes: int | None = None
    guidance_scale: float = 1.0
    dataset: str = "fashion-mnist"
    description: str = ""
    class_prompts: tuple[str, ...] | None = None
    """For a text-to-image pipeline scored like a class-conditional model: the prompt of each class."""
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments every call of the model's pipeline takes (e.g. max_sequence_length)."""

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["image_shape"] = list(self.image_shape)
        payload["class_prompts"] = None if self.class_prompts is None else list(self.class_prompts)
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ModelInfo:
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        known["image_shape"] = tuple(known["image_shape"])
        if known.get("class_prompts") is not None:
            known["class_prompts"] = tuple(known["class_prompts"])
        return cls(**known)


@dataclass
class DiffusionModel:
    """A denoiser with its noise schedule and metadata: everything needed to sample from it.

    Without `scheduler_config` the schedule is inferred from the family (flow-matching families
    get FlowMatchEulerDiscreteScheduler's defaults); where nothing can be inferred it is an error,
    never a silent guess. `pipeline` holds the diffusers pipeline this denoiser belongs to, if any.
    """

    denoiser: torch.nn.Module
    info: ModelInfo
    scheduler_config: dict[str, Any] | None = None
    path: Path | None = None
    quantization: dict[str, Any] | None = None
    """For a quantized model: method, config, per-layer structure and calibration facts (plain data)."""
    pipeline: Any | None = None

    def __post_init__(self) -> None:
        if self.scheduler_config is None:
            self.scheduler_config = infer_scheduler_config(self.denoiser, self.info.name)

    @property
    def adapter(self) -> FamilyAdapter:
        return adapter_for(self.denoiser)

    def train_scheduler(self):
        """The training noise schedule as a diffusers scheduler (the class its config names)."""
        return scheduler_from_config(self.scheduler_config)


def scheduler_from_config(config: dict[str, Any]):
    name = config.get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise DiffquantError(f"The scheduler config names '{name}', which diffusers does not have.")
    return scheduler_class.from_config(config)


def infer_scheduler_config(denoiser: torch.nn.Module, name: str) -> dict[str, Any]:
    """The training noise schedule a denoiser's family implies, or a clear error when it implies none."""
    adapter = adapter_for(denoiser)
    if adapter.flow_matching:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    raise ConfigError(
        f"Model '{name}' ({type(denoiser).__name__}) has no scheduler config and its family does not fix one. "
        "Pass scheduler_config= (e.g. the scheduler/scheduler_config.json of the pipeline it came from, or "
        "diffquant.model.DDPM_LINEAR_SCHEDULE if it was trained with DDPM's linear betas)."
    )


def load_float_directory(path: str | Path) -> DiffusionModel:
    """A float diffquant or plain diffusers model directory, in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DiffquantError(f"{path} is not a model directory: it has no config.json.")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise DiffquantError(f"{config_file} is not a valid JSON object ({error}); restore the file.") from error
    model_class = getattr(diffusers, class_name or "", None)
    if model_class is None:
        raise DiffquantError(f"{config_file} names model class '{class_name}', which diffusers does not have.")
    try:
        denoiser = model_class.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as error:
        raise DiffquantError(
            f"{path} has no loadable {class_name} weights ({str(error).splitlines()[0][:160]}); a quantized model "
            "directory also needs its quantization.json. Copy the directory again or re-save the model."
        ) from error
    denoiser.eval()
    metadata_file = path / METADATA_FILE
    if metadata_file.is_file():
        try:
            info = ModelInfo.from_json(json.loads(metadata_file.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise DiffquantError(f"{metadata_file} is not a valid model description ({error}); restore it.") from error
    else:  # a plain diffusers directory: the family adapter reads shape and classes from the config
        adapter = adapter_for(denoiser)
        info = ModelInfo(
            name=path.name,
            architecture=class_name,
            image_shape=adapter.latent_shape(denoiser.config),
            num_classes=adapter.num_classes(denoiser.config),
            dataset="",
        )
    scheduler_file = path / SCHEDULER_FILE
    try:
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    except json.JSONDecodeError as error:
        raise DiffquantError(f"{scheduler_file} is not valid JSON ({error}); restore it.") from error
    if scheduler_config is None and not adapter_for(denoiser).flow_matching:
        raise ConfigError(
            f"{path} has no {SCHEDULER_FILE} and {class_name} does not fix its noise schedule. Copy the "
            "scheduler_config.json of the pipeline the model came from into that file."
        )
    return DiffusionModel(denoiser, info, scheduler_config, path)


def save_float_directory(
    model: DiffusionModel, directory: str | Path, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write a model directory atomically: a crash leaves the old directory or none, never half of one."""
    directory = Path(directory)
    with atomic_directory(directory) as scratch:
        model.denoiser.save_pretrained(scratch, safe_serialization=True)
        write_json(scratch / SCHEDULER_FILE, model.scheduler_config)
        write_json(scratch / METADATA_FILE, model.info.to_json())
        for name, payload in (extra_files or {}).items():
            (scratch / name).write_bytes(payload)
    return directory
