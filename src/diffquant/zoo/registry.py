"""Reference-model registry: the models diffquant ships, and `load_model`, which dispatches between
float, quantized and exported model directories.

The model type and float directory I/O live in the bottom-layer `diffquant.model`; this module
re-exports them for compatibility.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffquant.errors import DiffquantError
from diffquant.fileio import recover_interrupted
from diffquant.model import DDPM_LINEAR_SCHEDULE as TRAIN_SCHEDULER_CONFIG
from diffquant.model import (
    METADATA_FILE,
    DiffusionModel,
    ModelInfo,
    load_float_directory,
    save_float_directory,
)
from diffquant.pipelines import is_pipeline_directory, load_pipeline
from diffquant.runtime.deploy import EXPORT_FILE, load_exported
from diffquant.runtime.storage import is_quantized_directory, load_quantized
from diffquant.zoo.architectures import FMNIST_DIT_CONFIG, FMNIST_UNET_CONFIG, build_dit, build_unet

WEIGHTS_DIR = Path(__file__).parent / "weights"
# every reference model is trained with DDPM's linear schedule (TRAIN_SCHEDULER_CONFIG)
save_model = save_float_directory

@dataclass(frozen=True)
class _Reference:
    info: ModelInfo
    builder: Any
    config: dict[str, Any]


REFERENCE_MODELS: dict[str, _Reference] = {
    "fmnist-unet": _Reference(
        ModelInfo(
            name="fmnist-unet",
            architecture="unet",
            image_shape=(1, 28, 28),
            description="Unconditional DDPM (epsilon) on 28x28 Fashion-MNIST, diffusers UNet2DModel.",
        ),
        build_unet,
        FMNIST_UNET_CONFIG,
    ),
    "fmnist-dit": _Reference(
        ModelInfo(
            name="fmnist-dit",
            architecture="dit",
            image_shape=(1, 28, 28),
            num_classes=10,
            # measured on the trained model: scale 2 lowered class accuracy (0.61 vs 0.70 at 3,500 steps)
            guidance_scale=1.0,
            description="Class-conditional DiT (epsilon, CFG) on 28x28 Fashion-MNIST pixels, "
            "diffusers DiTTransformer2DModel.",
        ),
        build_dit,
        FMNIST_DIT_CONFIG,
    ),
}


# Reference pipelines: diffusers pipeline directories (text encoders + autoencoder + denoiser), built
# and trained by their own module (diffquant.zoo.t2i), shipped under WEIGHTS_DIR/<name>.
REFERENCE_PIPELINES: dict[str, str] = {
    "fmnist-t2i": "Text-to-image SD3-style pipeline (CLIP text encoders, AutoencoderKL, MMDiT, rectified flow).",
}


def build_reference_model(name: str) -> DiffusionModel:
    """A freshly initialised (untrained) reference architecture, e.g. to train it."""
    reference = _lookup(name)
    return DiffusionModel(reference.builder(reference.config), reference.info, dict(TRAIN_SCHEDULER_CONFIG))


def _lookup(name: str) -> _Reference:
    if name not in REFERENCE_MODELS:
        close = difflib.get_close_matches(name, REFERENCE_MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DiffquantError(
            f"Unknown model '{name}'. Known reference models: {', '.join(REFERENCE_MODELS)}; "
            f"or pass a model directory.{hint}"
        )
    return REFERENCE_MODELS[name]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A reference-model name to its shipped directory; a path is checked and returned."""
    candidate = Path(name_or_path)
    recover_interrupted(candidate)  # a save killed between its two renames leaves the old model hidden
    if candidate.is_dir():
        return candidate
    if str(name_or_path) in REFERENCE_MODELS:
        shipped = WEIGHTS_DIR / str(name_or_path)
        if not (shipped / "config.json").is_file():
            raise DiffquantError(
                f"The reference model '{name_or_path}' has no trained weights in {shipped}. "
                f"Train them with `diffquant train --model {name_or_path}`."
            )
        return shipped
    if str(name_or_path) in REFERENCE_PIPELINES:
        shipped = WEIGHTS_DIR / str(name_or_path)
        if not (shipped / "model_index.json").is_file():
            raise DiffquantError(
                f"The reference pipeline '{name_or_path}' has no trained weights in {shipped}. "
                f"Train them with `diffquant train --model {name_or_path}`."
            )
        return shipped
    _lookup(str(name_or_path))  # raises with the list of known names
    raise AssertionError("unreachable")


def token_generator_path(name_or_path: str | Path) -> Path | None:
    """The directory of a token generator (a shipped name such as fmnist-vq, or a generator directory);
    None for anything else (continuous models go through `load_model`)."""
    from diffquant.tokens.generator import is_token_generator

    for candidate in (Path(name_or_path), WEIGHTS_DIR / str(name_or_path)):
        if candidate.is_dir() and is_token_generator(candidate):
            return candidate
    return None


def load_model(name_or_path: str | Path) -> DiffusionModel:
    """Load a reference model by name, or any diffquant/diffusers model directory, in eval mode."""
    if (tokens := token_generator_path(name_or_path)) is not None:
        raise DiffquantError(
            f"'{name_or_path}' is a token generator, not a diffusion model: load it with "
            f"diffquant.tokens.generator.TokenGenerator.load('{tokens}') (the CLI's sample, eval and bench take it)."
        )
    path = resolve_model_path(name_or_path)
    if (path / EXPORT_FILE).is_file():  # an exported directory: rebuilt on its backend
        return load_exported(path)
    if is_pipeline_directory(path):  # a diffusers pipeline, float or with quantized components
        return load_pipeline(path)
    if is_quantized_directory(path):  # a quantized directory: the runtime layer rebuilds it
        return load_quantized(path)
    return load_float_directory(path)


__all__ = [
    "METADATA_FILE",
    "REFERENCE_MODELS",
    "TRAIN_SCHEDULER_CONFIG",
    "WEIGHTS_DIR",
    "DiffusionModel",
    "ModelInfo",
    "build_reference_model",
    "load_model",
    "resolve_model_path",
    "save_model",
    "token_generator_path",
]
