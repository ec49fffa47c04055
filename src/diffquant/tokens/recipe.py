"""The fmnist-vq recipe: train the tokenizer, encode Fashion-MNIST, train the token denoiser."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffquant.data import load_fashion_mnist
from diffquant.fileio import write_json
from diffquant.tokens.denoiser import DenoiserConfig
from diffquant.tokens.storage import load_token_model, save_token_model
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder
from diffquant.tokens.training import DenoiserTraining, TokenizerTraining, train_denoiser, train_tokenizer


@torch.no_grad()
def encode_dataset(tokenizer: VQAutoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Token grids (M, h, w) of a whole image set."""
    tokenizer.eval()
    return torch.cat([tokenizer.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def train_reference(
    run_dir: str | Path,
    tokenizer_config: TokenizerConfig = TokenizerConfig(),
    tokenizer_training: TokenizerTraining = TokenizerTraining(),
    denoiser_training: DenoiserTraining = DenoiserTraining(),
    denoiser_width: int = 128,
    denoiser_depth: int = 4,
    data_dir: str | Path | None = None,
    log=print,
) -> dict:
    """Train both stages into run_dir/tokenizer and run_dir/denoiser; returns (and writes) a summary.

    A tokenizer already saved in run_dir/tokenizer is reused (resume after the first stage).
    """
    run_dir = Path(run_dir)
    # bad sizes fail now, not after the data is loaded or the tokenizer has trained for an hour
    tokenizer_config.validate()
    DenoiserConfig(width=denoiser_width, depth=denoiser_depth).validate()
    started = time.perf_counter()
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    if (run_dir / "tokenizer" / "config.json").is_file():
        tokenizer = load_token_model(run_dir / "tokenizer")
        tok_summary = json.loads((run_dir / "tokenizer" / "config.json").read_text())["training"]
        tokenizer_config = tokenizer.config
        log(f"reusing the tokenizer in {run_dir / 'tokenizer'}")
    else:
        tokenizer, tok_summary = train_tokenizer(tokenizer_config, train.images, tokenizer_training, test.images, log)
        log(f"tokenizer test: {tok_summary['test']}")
        save_token_model(tokenizer, run_dir / "tokenizer", {"training": {**asdict(tokenizer_training), **tok_summary}})
    tokens = encode_dataset(tokenizer, train.images)
    h, w = tokens.shape[1:3]
    config = DenoiserConfig(
        codebook_size=tokenizer.codebook_size, num_tokens=h * w, width=denoiser_width, depth=denoiser_depth
    )
    denoiser, den_summary = train_denoiser(config, tokens, train.labels, denoiser_training, log=log)
    save_token_model(denoiser, run_dir / "denoiser", {"training": {**asdict(denoiser_training), **den_summary}})
    summary = {
        "tokenizer": {"config": tokenizer_config.to_json(), "training": asdict(tokenizer_training), **tok_summary},
        "denoiser": {"config": config.to_json(), "training": asdict(denoiser_training), **den_summary},
        "wall_minutes": (time.perf_counter() - started) / 60,
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def train_generator(run_dir: str | Path, command: str, **recipe) -> tuple[Path, dict]:
    """`train_reference`, then the tokenizer and denoiser saved as one generator in run_dir/model (what
    `diffquant train --model fmnist-vq` and `diffquant tokens train` leave behind)."""
    from diffquant.tokens.generator import TokenGenerator

    run_dir = Path(run_dir)
    summary = train_reference(run_dir, **recipe)
    generator = TokenGenerator(
        load_token_model(run_dir / "tokenizer"), load_token_model(run_dir / "denoiser"), run_dir.name
    )
    card = {"training": {"command": command, "wall_minutes": summary["wall_minutes"]}}
    return generator.save(run_dir / "model", card), summary
