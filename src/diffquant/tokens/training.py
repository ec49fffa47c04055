"""Training loops for the tokenizer and the token denoiser (CPU-sized, time-budgeted, logged)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.errors import ConfigError
from diffquant.evaluation.agreement import psnr
from diffquant.tokens.denoiser import DenoiserConfig, TokenDenoiser
from diffquant.tokens.quantizers import usage_stats
from diffquant.tokens.schedule import MaskReplaceSchedule, cosine_mask_ratio
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder
from diffquant.training.ema import ExponentialMovingAverage

Log = Callable[[str], None]


def _start_step(optimizer, training, step: int, started: float, log, what: str) -> bool:
    """Set this step's learning rate; False once the run's time budget is spent."""
    if training.max_minutes is not None and time.perf_counter() - started > 60 * training.max_minutes:
        log(f"{what}: time budget reached at step {step}")
        return False
    fraction = _time_fraction(started, training.max_minutes)
    for group in optimizer.param_groups:
        group["lr"] = _lr_at(step, training.steps, training.learning_rate, training.warmup, fraction)
    return True


def _lr_at(step: int, total: int, peak: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 10% of the peak, over steps or the wall-time budget if sooner."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_fraction)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _time_fraction(started: float, max_minutes: float | None) -> float:
    return 0.0 if max_minutes is None else (time.perf_counter() - started) / (60 * max_minutes)


@dataclass(frozen=True)
class TokenizerTraining:
    """Reconstruction (MSE) + quantizer loss, AdamW; the defaults are the brief's demo preset."""

    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup: int = 100
    max_minutes: float | None = None  # stop early at this wall time (the schedule still ends at `steps`)
    log_every: int = 100
    seed: int = 0


@torch.no_grad()
def tokenizer_report(model: VQAutoencoder, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Test-set reconstruction PSNR (dB, images in [0, 1]), codebook usage and perplexity."""
    model.eval()
    scores, indices = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        tokens = model.encode(batch)
        scores.append(psnr(model.decode(tokens), batch))
        indices.append(tokens.reshape(-1))
    out = usage_stats(torch.cat(indices), model.codebook_size)
    out["psnr"] = torch.cat(scores).mean().item()
    return out


def train_tokenizer(
    config: TokenizerConfig,
    images: torch.Tensor,
    training: TokenizerTraining = TokenizerTraining(),
    test_images: torch.Tensor | None = None,
    log: Log = print,
) -> tuple[VQAutoencoder, dict]:
    """Train a VQ autoencoder on images in [-1, 1]; logs usage and perplexity every `log_every` steps."""
    if len(images) < training.batch_size:
        raise ConfigError(f"Need at least batch_size={training.batch_size} images, got {len(images)}.")
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    model = VQAutoencoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=0.0)
    started = time.perf_counter()
    history: list[dict] = []
    step = 0
    for step in range(training.steps):
        if not _start_step(optimizer, training, step, started, log, "tokenizer"):
            break
        model.train()
        batch = images[torch.randint(0, len(images), (training.batch_size,), generator=generator)]
        recon, out = model(batch)
        loss = F.mse_loss(recon, batch) + out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % training.log_every == 0 or step == training.steps - 1:
            row = {"step": step, "loss": loss.item(), "minutes": (time.perf_counter() - started) / 60}
            row.update({k: out.stats[k] for k in ("usage", "perplexity") if k in out.stats})
            history.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    model.eval()
    summary = {"steps": step + 1, "minutes": (time.perf_counter() - started) / 60, "history": history}
    if test_images is not None:
        summary["test"] = tokenizer_report(model, test_images)
    return model, summary


@dataclass(frozen=True)
class DenoiserTraining:
    """x0 cross-entropy on a mixture of absorbing (MaskGIT cosine ratio) and mask-and-replace noise."""

    steps: int = 4000
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    label_drop: float = 0.1  # classifier-free guidance: replace the label by the learned null class
    absorbing_fraction: float = 0.5  # share of batches with mask-only noise (the MaskGIT/FHS regime)
    ema_decay: float = 0.999
    max_minutes: float | None = None
    log_every: int = 100
    seed: int = 0


def corrupt(
    tokens: torch.Tensor,
    codebook_size: int,
    schedule: MaskReplaceSchedule,
    absorbing: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy tokens and the positions the loss covers (absorbing: masked ones; mask-and-replace: all)."""
    b, n = tokens.shape
    if absorbing:
        ratio = cosine_mask_ratio(torch.rand(b, generator=generator, dtype=torch.float64))
        count = (ratio * n).ceil().clamp(1, n).long()
        ranks = torch.rand(b, n, generator=generator).argsort(1).argsort(1)
        masked = ranks < count[:, None]
        return torch.where(masked, torch.full_like(tokens, codebook_size), tokens), masked
    t = torch.randint(1, schedule.steps + 1, (b,), generator=generator)
    noisy = schedule.q_sample(tokens, t, codebook_size, generator)
    return noisy, torch.ones_like(tokens, dtype=torch.bool)


def train_denoiser(
    config: DenoiserConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    training: DenoiserTraining = DenoiserTraining(),
    schedule: MaskReplaceSchedule = MaskReplaceSchedule(),
    log: Log = print,
) -> tuple[TokenDenoiser, dict]:
    """Train a class-conditional token denoiser on flattened token grids (M, N); returns its EMA weights."""
    tokens = tokens.reshape(len(tokens), -1)
    if tokens.shape[1] != config.num_tokens:
        raise ConfigError(f"tokens have {tokens.shape[1]} positions, the denoiser expects {config.num_tokens}.")
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    model = TokenDenoiser(config)
    ema = ExponentialMovingAverage(model, training.ema_decay)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.learning_rate, betas=(0.9, 0.96), weight_decay=training.weight_decay
    )
    started = time.perf_counter()
    history: list[dict] = []
    step = 0
    for step in range(training.steps):
        if not _start_step(optimizer, training, step, started, log, "denoiser"):
            break
        model.train()
        index = torch.randint(0, len(tokens), (training.batch_size,), generator=generator)
        x0, y = tokens[index], labels[index].clone()
        y[torch.rand(len(y), generator=generator) < training.label_drop] = config.null_class
        absorbing = bool(torch.rand(1, generator=generator).item() < training.absorbing_fraction)
        noisy, covered = corrupt(x0, config.codebook_size, schedule, absorbing, generator)
        logits = model(noisy, y)
        loss = F.cross_entropy(logits[covered], x0[covered])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        if step % training.log_every == 0 or step == training.steps - 1:
            row = {
                "step": step,
                "loss": loss.item(),
                "absorbing": absorbing,
                "minutes": (time.perf_counter() - started) / 60,
            }
            history.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    ema.copy_to(model)
    model.eval()
    return model, {"steps": step + 1, "minutes": (time.perf_counter() - started) / 60, "history": history}
