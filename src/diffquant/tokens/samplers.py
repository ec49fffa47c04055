"""Three samplers over one x0-predicting token denoiser; every categorical draw is float64.

- VQ-Diffusion posterior sampler (Gu et al. 2022; Tang et al. 2022): mask-and-replace posterior with
  x0-reparameterised step skipping, truncation and learned-null classifier-free guidance.
- MaskGIT (Chang et al. 2022): confidence re-masking on a cosine schedule with an annealed choice temperature.
- First-hitting sampler (Zheng et al. 2024): each masked token is revealed at its own first-hitting time
  of the linear schedule, in random order; `calls` groups the events onto that many network evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffquant.errors import ConfigError
from diffquant.tokens.categorical import gumbel_noise, sample_categorical
from diffquant.tokens.denoiser import TokenDenoiser
from diffquant.tokens.schedule import MaskReplaceSchedule, cosine_mask_ratio, vq_posterior

SAMPLERS = ("vqdiffusion", "maskgit", "fhs")


@dataclass(frozen=True)
class TokenSamplerConfig:
    """Which sampler, how many network evaluations per image (x2 with guidance) and its knobs."""

    sampler: str = "maskgit"
    steps: int = 8  # MaskGIT / VQ-Diffusion steps; FHS network calls (<= num_tokens; num_tokens = exact FHS)
    guidance_scale: float = 1.0  # 1 = no guidance; > 1 runs the learned null class too
    truncation: float = 1.0  # VQ-Diffusion: keep the top classes holding this much x0 mass (r; 1 = off)
    choice_temperature: float = 4.5  # MaskGIT: Gumbel scale on log confidence, annealed linearly to 0
    temperature: float = 1.0  # token sampling temperature on p(x0 | x_t)
    schedule_steps: int = 100  # VQ-Diffusion: T of the training chain, sampled with `steps` skips

    def validate(self, num_tokens: int | None = None) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"Unknown token sampler '{self.sampler}'. Choose one of: {', '.join(SAMPLERS)}.")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.sampler == "vqdiffusion" and self.steps > self.schedule_steps:
            raise ConfigError(f"vqdiffusion steps {self.steps} exceed the chain length {self.schedule_steps}.")
        if not 0 < self.truncation <= 1:
            raise ConfigError(f"truncation must be in (0, 1], got {self.truncation}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}.")

    def network_calls(self, num_tokens: int) -> int:
        """Network evaluations per image (a guided call counts twice)."""
        calls = min(self.steps, num_tokens) if self.sampler == "fhs" else self.steps
        return calls * (2 if self.guidance_scale != 1.0 else 1)


def guided_log_probs(
    denoiser: TokenDenoiser, tokens: torch.Tensor, labels: torch.Tensor | None, scale: float, temperature: float = 1.0
) -> torch.Tensor:
    """log p(x0 | x_t) in float64; guided: log p_u + s (log p_c - log p_u), renormalised (Improved VQ-Diffusion)."""
    null = torch.full((tokens.shape[0],), denoiser.config.null_class, dtype=torch.long)
    if labels is None or scale == 1.0:
        logits = denoiser(tokens, labels if labels is not None else null).double()
        return torch.log_softmax(logits / temperature, -1)
    both = denoiser(torch.cat([tokens, tokens]), torch.cat([labels, null])).double()
    cond, uncond = torch.log_softmax(both / temperature, -1).chunk(2)
    return torch.log_softmax(uncond + scale * (cond - uncond), -1)


def truncate(log_probs: torch.Tensor, rate: float) -> torch.Tensor:
    """Keep classes while the sorted cumulative probability stays below `rate` (the top one always)."""
    if rate >= 1.0:
        return log_probs
    sorted_lp, order = log_probs.sort(-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    keep_sorted = (cum - sorted_lp.exp()) < rate  # mass before this class is below the rate
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.log_softmax(log_probs.masked_fill(~keep, -math.inf), -1)


@torch.no_grad()
def sample_vqdiffusion(
    denoiser: TokenDenoiser, labels: torch.Tensor | None, config: TokenSamplerConfig, generator: torch.Generator, n: int
) -> torch.Tensor:
    c = denoiser.config
    schedule = MaskReplaceSchedule(steps=config.schedule_steps)
    x = torch.full((n, c.num_tokens), c.mask_token, dtype=torch.long)
    times = torch.linspace(config.schedule_steps, 0, config.steps + 1).round().long().tolist()
    for t, s in zip(times[:-1], times[1:], strict=True):
        log_p = truncate(
            guided_log_probs(denoiser, x, labels, config.guidance_scale, config.temperature), config.truncation
        )
        posterior = vq_posterior(log_p.exp(), x, schedule, t, s)
        x = sample_categorical(posterior.log(), generator)
    return x


@torch.no_grad()
def sample_maskgit(
    denoiser: TokenDenoiser, labels: torch.Tensor | None, config: TokenSamplerConfig, generator: torch.Generator, n: int
) -> torch.Tensor:
    c = denoiser.config
    x = torch.full((n, c.num_tokens), c.mask_token, dtype=torch.long)
    for i in range(config.steps):
        masked = x == c.mask_token
        log_p = guided_log_probs(denoiser, x, labels, config.guidance_scale, config.temperature)
        drawn = sample_categorical(log_p, generator)
        confidence = log_p.gather(-1, drawn[..., None]).squeeze(-1)
        anneal = config.choice_temperature * (1 - (i + 1) / config.steps)
        confidence = confidence + anneal * gumbel_noise(tuple(confidence.shape), generator)
        confidence = confidence.masked_fill(~masked, math.inf)  # fixed tokens are never re-masked
        candidate = torch.where(masked, drawn, x)
        still = masked.sum(1)
        target = (cosine_mask_ratio((i + 1) / config.steps) * c.num_tokens).floor().long()
        # reveal at least one token per step while any is masked (aMUSEd's rule)
        keep_masked = torch.minimum(target.expand_as(still), (still - 1).clamp_min(0))
        ranks = confidence.argsort(1).argsort(1)
        x = torch.where(ranks < keep_masked[:, None], torch.full_like(x, c.mask_token), candidate)
    return x


@torch.no_grad()
def sample_first_hitting(
    denoiser: TokenDenoiser, labels: torch.Tensor | None, config: TokenSamplerConfig, generator: torch.Generator, n: int
) -> torch.Tensor:
    c = denoiser.config
    length = c.num_tokens
    calls = min(config.steps, length)
    # first-hitting times of the linear schedule: with m tokens masked at time t, the next one unmasks
    # at t * u^(1/m) (Zheng et al., Prop. 4.1); the positions are revealed in uniformly random order
    u = torch.rand(n, length, generator=generator, dtype=torch.float64)
    exponents = 1.0 / torch.arange(length, 0, -1, dtype=torch.float64)
    times = torch.cumprod(u**exponents, 1)  # (n, length), decreasing
    order = torch.rand(n, length, generator=generator).argsort(1)
    # call k evaluates the network at grid time 1 - k / calls and reveals every event up to the next grid
    # time from that one output (exact FHS when calls == length: one event per call, grouped by rank)
    if calls == length:
        group = torch.arange(length).expand(n, length)
    else:
        group = ((1 - times) * calls).floor().clamp(0, calls - 1).long()
    x = torch.full((n, length), c.mask_token, dtype=torch.long)
    for k in range(calls):
        reveal = group == k  # (n, length) over event ranks
        if not reveal.any():
            continue
        log_p = guided_log_probs(denoiser, x, labels, config.guidance_scale, config.temperature)
        drawn = sample_categorical(log_p, generator)
        hit = torch.zeros(n, length, dtype=torch.bool).scatter(1, order, reveal)  # event rank -> position
        x = torch.where(hit, drawn, x)
    return x


_SAMPLER_FUNCTIONS = {"vqdiffusion": sample_vqdiffusion, "maskgit": sample_maskgit, "fhs": sample_first_hitting}


def sample_tokens(
    denoiser: TokenDenoiser,
    num_samples: int,
    config: TokenSamplerConfig = TokenSamplerConfig(),
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Token sequences (num_samples, N) with no mask token left, deterministic for a seed."""
    config.validate()
    if labels is not None and len(labels) != num_samples:
        raise ConfigError(f"{len(labels)} labels for {num_samples} samples; pass one label per sample.")
    generator = torch.Generator().manual_seed(seed)
    denoiser.eval()
    tokens = _SAMPLER_FUNCTIONS[config.sampler](denoiser, labels, config, generator, num_samples)
    if (tokens == denoiser.config.mask_token).any():
        raise ConfigError("sampler left mask tokens; this is a bug in the sampler schedule.")
    return tokens
