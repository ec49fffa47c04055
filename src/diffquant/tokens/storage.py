"""Save and load token models as directories: config.json + model.safetensors (bit-exact round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_directory, write_json
from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder

_KINDS = {"tokenizer": (VQAutoencoder, TokenizerConfig), "token-denoiser": (TokenDenoiser, DenoiserConfig)}


def _kind_of(model: torch.nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise DiffquantError(
        f"Cannot save a {type(model).__name__}: only VQAutoencoder and TokenDenoiser are token models."
    )


def save_token_model(model: torch.nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model` (a tokenizer or a token denoiser) to `directory` atomically."""
    kind = _kind_of(model)
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_directory(directory) as scratch:
        save_file(state, str(scratch / "model.safetensors"))
        write_json(scratch / "config.json", {"kind": kind, "config": model.config.to_json(), **(extra or {})})
    return Path(directory)


def load_token_model(directory: str | Path) -> torch.nn.Module:
    """Load a directory written by `save_token_model`, in eval mode."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise DiffquantError(f"{directory} holds no token model (config.json missing); save one with save_token_model.")
    meta = json.loads(config_file.read_text())
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise DiffquantError(f"{config_file} is of kind '{kind}', expected one of {', '.join(_KINDS)}.")
    cls, config_cls = _KINDS[kind]
    config = config_cls.from_json(meta["config"]) if hasattr(config_cls, "from_json") else config_cls(**meta["config"])
    model = cls(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
