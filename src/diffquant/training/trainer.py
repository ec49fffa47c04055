"""Epsilon-prediction DDPM training with EMA, periodic checkpoints and bit-exact resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding
from tqdm.auto import tqdm

from diffquant.data.images import ImageSet
from diffquant.errors import ConfigError
from diffquant.model import DiffusionModel
from diffquant.model import save_float_directory as save_model
from diffquant.training.checkpoint import (
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from diffquant.training.ema import ExponentialMovingAverage


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_model`."""

    steps: int = 8000
    """Total optimisation steps (a resumed run continues up to this count)."""
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    """Linear learning-rate warm-up, then constant."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    """Share of class labels replaced by the null class (for classifier-free guidance)."""
    checkpoint_every: int = 500
    seed: int = 0
    log_every: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate}.")


@dataclass
class TrainResult:
    steps: int
    wall_time_s: float
    final_loss: float
    parameters: int


def _denoiser_loss(
    model: DiffusionModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    class_dropout: float = 0.0,
):
    scheduler = model.train_scheduler()
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator)
    noisy = scheduler.add_noise(images, noise, timesteps)
    kwargs = {}
    if model.info.conditional:
        # one null-label decision per sample for the whole network (guidance needs a consistent
        # unconditional mode)
        dropped = torch.rand(labels.shape[0], generator=generator) < class_dropout
        kwargs["class_labels"] = torch.where(dropped, model.info.num_classes, labels)
    prediction = model.denoiser(noisy, timesteps, **kwargs).sample
    return F.mse_loss(prediction, noise)


def train_model(
    model: DiffusionModel,
    data: ImageSet,
    config: TrainConfig,
    run_dir: str | Path,
    command: str = "",
    on_checkpoint: Callable[[DiffusionModel, int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place on `data`, resuming from `run_dir/checkpoint` when one exists.

    Writes `run_dir/checkpoint` (full state, every `checkpoint_every` steps and at the end) and
    `run_dir/model` (the EMA weights as a model directory) at the end. The EMA weights are left in
    `model.denoiser` when it returns.
    """
    config.validate()
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoint"
    denoiser = model.denoiser
    denoiser.train()
    for module in denoiser.modules():
        # diffusers' DiT drops labels inside every block independently, so no sample is ever
        # unconditional throughout; the trainer drops them once per sample instead
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    ema = ExponentialMovingAverage(denoiser, config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step, elapsed, history = 0, 0.0, []

    if (checkpoint_dir / "state.json").is_file():
        tensors, meta = load_checkpoint(checkpoint_dir)
        denoiser.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.num_updates = meta["ema_updates"]
        unflatten_optimizer(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["rng.generator"])
        step, elapsed, history = meta["step"], meta["wall_time_s"], meta.get("history", [])

    parameters = sum(p.numel() for p in denoiser.parameters())

    def checkpoint() -> None:
        optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer)
        tensors = {f"model.{k}": v for k, v in denoiser.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        tensors.update(optimizer_tensors)
        tensors["rng.generator"] = generator.get_state()
        meta = {
            "step": step,
            "wall_time_s": elapsed,
            "ema_updates": ema.num_updates,
            "optimizer": optimizer_meta,
            "config": asdict(config),
            "command": command,
            "parameters": parameters,
            "history": history,
        }
        save_checkpoint(checkpoint_dir, tensors, meta)

    bar = tqdm(total=config.steps, initial=step, desc=f"train {model.info.name}", disable=not progress)
    loss_value = float("nan")
    running = 0.0
    while step < config.steps:
        started = time.perf_counter()
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        lr_scale = min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_scale
        loss = _denoiser_loss(model, data.images[index], data.labels[index], generator, config.class_dropout)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"Training loss became {loss.item()} at step {step}; lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(denoiser)
        step += 1
        elapsed += time.perf_counter() - started
        loss_value = loss.item()
        running += loss_value
        bar.update(1)
        if step % config.log_every == 0:
            history.append({"step": step, "loss": running / config.log_every, "wall_time_s": round(elapsed, 1)})
            bar.set_postfix(loss=f"{running / config.log_every:.4f}")
            running = 0.0
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
            if on_checkpoint is not None:
                live = {k: v.clone() for k, v in denoiser.state_dict().items()}
                ema.copy_to(denoiser)
                denoiser.eval()
                on_checkpoint(model, step)
                denoiser.load_state_dict(live)
                denoiser.train()
    bar.close()
    if not math.isfinite(loss_value) and history:
        loss_value = history[-1]["loss"]  # a resumed run that had nothing left to do

    ema.copy_to(denoiser)
    denoiser.eval()
    save_model(model, run_dir / "model")
    return TrainResult(step, elapsed, loss_value, parameters)
