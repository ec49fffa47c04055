"""The reference models diffquant ships, and loading/saving of diffusers-style model directories."""

from diffquant.zoo.registry import (
    REFERENCE_MODELS,
    DiffusionModel,
    ModelInfo,
    build_reference_model,
    load_model,
    resolve_model_path,
    save_model,
)

__all__ = [
    "REFERENCE_MODELS",
    "DiffusionModel",
    "ModelInfo",
    "build_reference_model",
    "load_model",
    "resolve_model_path",
    "save_model",
]
