"""The `fmnist-t2i` reference pipeline: a tiny SD3-style text-to-image model trained on Fashion-MNIST.

Components, all built from the installed libraries and trained from scratch (nothing downloaded):
- a word-level tokenizer built from the caption vocabulary (a `tokenizers.Tokenizer` wrapped as a
  transformers fast tokenizer, so diffusers saves and loads it like any other);
- two tiny `CLIPTextModelWithProjection` encoders (the two CLIP slots of SD3; the T5 slot is empty);
- a small `AutoencoderKL` (28x28x1 pixels <-> 14x14x4 latents);
- a small `SD3Transformer2DModel` (MMDiT) trained with rectified flow and classifier-free guidance.

The directory is a standard `StableDiffusion3Pipeline` (text_encoder_3 / tokenizer_3 = None). SD3
appends `max_sequence_length` zero "T5" tokens to the prompt; this model is trained without them, so
it must be sampled with `max_sequence_length=0`, which `FmnistT2IPipeline` (a thin subclass) makes
the default.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from diffquant.data.images import ImageSet
from diffquant.errors import ConfigError, DiffquantError
from diffquant.fileio import atomic_directory, write_json
from diffquant.model import METADATA_FILE, ModelInfo
from diffquant.training.checkpoint import (
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from diffquant.training.ema import ExponentialMovingAverage
from diffquant.zoo.registry import resolve_model_path

# ----------------------------------------------------------------------------------------------
# Captions and tokenizer

# Words a prompt may use for each Fashion-MNIST class (index = label); the first is canonical.
CLASS_WORDS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "top", "tee"),
    ("trousers", "pants", "trouser"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown"),
    ("coat", "jacket"),
    ("sandal", "sandals"),
    ("shirt", "blouse"),
    ("sneaker", "trainer", "sneakers"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "boots"),
)
TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {name}",
    "a picture of {a} {name}",
    "an image of {a} {name}",
    "{name}, studio shot",
    "{name}",
    "{a} {name}",
    "the {name}",
    "{a} {name} on a black background",
    "a small grayscale photo of {a} {name}",
    "product photo of {a} {name}",
    "a low resolution photo of the {name}",
    "{a} centered {name}, product shot",
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_TOKENS = 16
"""Tokens per prompt including <bos>/<eos> (the text encoders' position count)."""

# isolate punctuation other than the hyphen (so "t-shirt" is one word and "shot," is two)
_PUNCTUATION = r"[,.;:!?/]"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(label: int, template: int = 0, synonym: int = 0) -> str:
    """A caption for class `label` from template and synonym indices (wrapped modulo their counts)."""
    words = CLASS_WORDS[label]
    name = words[synonym % len(words)]
    return TEMPLATES[template % len(TEMPLATES)].format(a=_article(name), name=name)


def prompt_for(label: int) -> str:
    """The canonical prompt of a class, used for evaluation: 'a photo of a sneaker'."""
    return caption(label, 0, 0)


def random_captions(labels: torch.Tensor, generator: torch.Generator, dropout: float = 0.0) -> list[str]:
    """One random caption per label; a `dropout` share becomes '' (the unconditional prompt of CFG)."""
    templates = torch.randint(0, len(TEMPLATES), (len(labels),), generator=generator).tolist()
    synonyms = torch.randint(0, 6, (len(labels),), generator=generator).tolist()
    dropped = (torch.rand(len(labels), generator=generator) < dropout).tolist()
    return [
        "" if drop else caption(int(label), template, synonym)
        for label, template, synonym, drop in zip(labels.tolist(), templates, synonyms, dropped, strict=True)
    ]


def caption_words(text: str) -> list[str]:
    """The words a caption tokenizes into (lower case, punctuation split off)."""
    return re.sub(f"({_PUNCTUATION})", r" \1 ", text.lower()).split()


def caption_vocabulary() -> list[str]:
    """Every word the templates and class names can produce, sorted (the tokenizer's vocabulary)."""
    words: set[str] = set()
    for label, names in enumerate(CLASS_WORDS):
        for template in range(len(TEMPLATES)):
            for synonym in range(len(names)):
                words.update(caption_words(caption(label, template, synonym)))
    return sorted(words)


def build_tokenizer(max_length: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary: '<bos> words <eos>', padded with <pad>."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *caption_vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PUNCTUATION), "isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


# ----------------------------------------------------------------------------------------------
# Architecture


@dataclass
class T2IArchitecture:
    """Sizes of the four trained components (defaults: the shipped model)."""

    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_projection: int = 32
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    transformer_layers: int = 4
    transformer_heads: int = 2
    head_dim: int = 32
    patch_size: int = 2

    @property
    def latent_size(self) -> int:
        return 28 // 2 ** (len(self.vae_channels) - 1)


def build_text_encoder(arch: T2IArchitecture, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_width,
        intermediate_size=2 * arch.text_width,
        projection_dim=arch.text_projection,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        # not 2: CLIP then pools at the first <eos> rather than at the largest token id
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_vae(arch: T2IArchitecture) -> AutoencoderKL:
    blocks = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=8,
        sample_size=28,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # both set from the encoded training set after the autoencoder is trained
        shift_factor=0.0,
    )


def build_transformer(arch: T2IArchitecture) -> SD3Transformer2DModel:
    width = arch.transformer_heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=arch.latent_size,
        patch_size=arch.patch_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        num_layers=arch.transformer_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.transformer_heads,
        joint_attention_dim=2 * arch.text_width,  # the two CLIP hidden states, concatenated
        caption_projection_dim=width,
        pooled_projection_dim=2 * arch.text_projection,
        pos_embed_max_size=arch.latent_size // arch.patch_size,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # shift 1: 28x28 images need no shift of the schedule towards noise (SD3 uses 3 at 1024 px)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 20


class FmnistT2IPipeline(StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with this model's sampling defaults (no T5 tokens, its guidance scale)."""

    def __call__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("max_sequence_length", 0)  # trained without the (absent) T5 encoder's tokens
        kwargs.setdefault("guidance_scale", DEFAULT_GUIDANCE)
        kwargs.setdefault("num_inference_steps", DEFAULT_STEPS)
        return super().__call__(*args, **kwargs)


def build_pipeline(arch: T2IArchitecture | None = None, seed: int = 0) -> FmnistT2IPipeline:
    """A freshly initialised (untrained) pipeline, seeded."""
    arch = arch or T2IArchitecture()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return FmnistT2IPipeline(
        transformer=build_transformer(arch),
        scheduler=build_scheduler(),
        vae=build_vae(arch),
        text_encoder=build_text_encoder(arch, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(arch, tokenizer),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def load_pipeline(path: str | Path) -> FmnistT2IPipeline:
    """Load a saved fmnist-t2i pipeline directory in eval mode."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise DiffquantError(f"{path} is not a pipeline directory: it has no model_index.json.")
    # SD3 lists its T5 slot as required: an empty one must be passed explicitly, as diffusers documents
    pipe = FmnistT2IPipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, use_safetensors=True, low_cpu_mem_usage=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: StableDiffusion3Pipeline,
    labels: torch.Tensor | list[int],
    seed: int = 0,
    batch_size: int = 250,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> torch.Tensor:
    """Images in [-1, 1] of shape (N, 1, 28, 28) for the canonical prompt of each label.

    Batch b is drawn with the generator seeded `seed + b`, so a set is reproducible for a seed and
    batch size whatever else ran before.
    """
    labels = torch.as_tensor(labels)
    images = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        prompts = [prompt_for(int(label)) for label in labels[start : start + batch_size]]
        output = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=0,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
        )
        images.append(output.images * 2.0 - 1.0)  # the pipeline returns [0, 1]
    return torch.cat(images)


def load_reference_pipeline(name: str = "fmnist-t2i") -> FmnistT2IPipeline:
    """The shipped reference pipeline, by name."""
    return load_pipeline(resolve_model_path(name))


def reference_info(arch: T2IArchitecture | None = None) -> ModelInfo:
    """What fmnist-t2i generates: scored like a 10-class model whose class c is prompted 'a photo of a ...'."""
    arch = arch or T2IArchitecture()
    return ModelInfo(
        name="fmnist-t2i",
        architecture="SD3Transformer2DModel",
        image_shape=(arch.latent_channels, arch.latent_size, arch.latent_size),
        num_classes=len(CLASS_WORDS),
        guidance_scale=DEFAULT_GUIDANCE,
        description="Text-to-image SD3-style pipeline on Fashion-MNIST (CLIP text encoders, AutoencoderKL, MMDiT).",
        class_prompts=tuple(prompt_for(label) for label in range(len(CLASS_WORDS))),
        pipeline_kwargs={"max_sequence_length": 0},  # trained without the (absent) T5 encoder's tokens
    )


def save_pipeline(pipe: StableDiffusion3Pipeline, directory: str | Path) -> Path:
    """Write the pipeline atomically as a standard `StableDiffusion3Pipeline` directory, plus diffquant.json
    (what it generates, so `diffquant.load` samples and scores it with this model's defaults)."""
    directory = Path(directory)
    standard = StableDiffusion3Pipeline(**pipe.components)  # model_index.json names the diffusers class
    with atomic_directory(directory) as scratch:
        standard.save_pretrained(scratch, safe_serialization=True)
        write_json(scratch / METADATA_FILE, reference_info().to_json())
    return directory


def parameter_counts(pipe: StableDiffusion3Pipeline) -> dict[str, int]:
    names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in names}


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class T2ITrainConfig:
    """Hyper-parameters of both training stages (autoencoder, then MMDiT + text encoders)."""

    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-4
    """Weight of the KL term against the per-pixel MSE (both means): a lightly regularised latent."""
    steps: int = 4000
    """MMDiT + text-encoder steps (a resumed run continues up to this count)."""
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    """Share of captions replaced by '' (the unconditional prompt of classifier-free guidance)."""
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0

    def validate(self) -> None:
        for name in ("vae_steps", "vae_batch_size", "steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"T2ITrainConfig.{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")


def _vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, kl_weight: float):
    posterior = vae.encode(images).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(latents).sample
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return F.mse_loss(reconstruction, images) + kl_weight * kl


def encode_captions(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings exactly as the pipeline computes them when sampling (with gradients)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=0,
    )
    return embeds, pooled


def _flow_loss(
    pipe: StableDiffusion3Pipeline,
    latents: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    caption_dropout: float,
) -> torch.Tensor:
    """Rectified-flow loss: predict (noise - x0) at x_t = (1 - t) x0 + t noise, t logit-normal (SD3)."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
    noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    embeds, pooled = encode_captions(pipe, random_captions(labels, generator, caption_dropout))
    prediction = pipe.transformer(
        hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t * 1000
    ).sample
    return F.mse_loss(prediction, noise - latents)


@dataclass
class StageResult:
    steps: int
    wall_time_s: float
    final_loss: float
    history: list[dict[str, float]]


def _train_stage(
    modules: torch.nn.Module,
    loss_fn: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    learning_rate: float,
    config: T2ITrainConfig,
    checkpoint_dir: Path,
    seed: int,
    meta_extra: dict[str, Any],
    log: Callable[[str], None] = print,
) -> StageResult:
    """AdamW + EMA loop over `modules`, checkpointing (resumable bit-exactly) into `checkpoint_dir`."""
    modules.train()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=learning_rate, weight_decay=config.weight_decay)
    ema = ExponentialMovingAverage(modules, config.ema_decay)
    generator = torch.Generator().manual_seed(seed)
    step, elapsed, history = 0, 0.0, []
    if (checkpoint_dir / "state.json").is_file():
        tensors, meta = load_checkpoint(checkpoint_dir)
        modules.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.num_updates = meta["ema_updates"]
        unflatten_optimizer(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["rng.generator"])
        step, elapsed, history = meta["step"], meta["wall_time_s"], meta.get("history", [])

    def checkpoint() -> None:
        optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer)
        tensors = {f"model.{k}": v for k, v in modules.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        tensors.update(optimizer_tensors)
        tensors["rng.generator"] = generator.get_state()
        meta = {
            "step": step,
            "wall_time_s": elapsed,
            "ema_updates": ema.num_updates,
            "optimizer": optimizer_meta,
            "config": asdict(config),
            "history": history,
            **meta_extra,
        }
        save_checkpoint(checkpoint_dir, tensors, meta)

    running, loss_value = 0.0, float("nan")
    while step < steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))
        loss = loss_fn(generator)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"Training loss became {loss_value} at step {step}; lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(modules)
        step += 1
        elapsed += time.perf_counter() - started
        running += loss_value
        if step % config.log_every == 0:
            history.append({"step": step, "loss": running / config.log_every, "wall_time_s": round(elapsed, 1)})
            log(f"{checkpoint_dir.name} step {step}/{steps} loss {running / config.log_every:.4f} {elapsed:.0f}s")
            running = 0.0
        if step % config.checkpoint_every == 0 or step == steps:
            checkpoint()
    if not math.isfinite(loss_value) and history:
        loss_value = history[-1]["loss"]  # a resumed run with nothing left to do
    ema.copy_to(modules)
    modules.eval()
    return StageResult(step, elapsed, loss_value, history)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """Posterior means and standard deviations of every image (latents are drawn from them per step)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def normalise_latents(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Encode the data set and set the VAE's shift/scaling factors so latents have mean 0, std 1.

    The pipeline decodes `latents / scaling_factor + shift_factor`. Returns (means, stds, shift, scale).
    """
    means, stds = encode_dataset(vae, images)
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(seed))
    shift, scale = sampled.mean().item(), 1.0 / sampled.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return means, stds, shift, scale


def _load_stage(modules: torch.nn.Module, checkpoint_dir: Path) -> dict[str, Any]:
    """Load a stage checkpoint's EMA weights into `modules`; returns its metadata."""
    tensors, meta = load_checkpoint(checkpoint_dir)
    modules.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=False)
    return meta


def pipeline_from_checkpoints(run_dir: str | Path, data: ImageSet) -> tuple[FmnistT2IPipeline, int]:
    """The pipeline with the EMA weights of a (possibly unfinished) run's latest checkpoints, and its step.

    Lets a run be scored or shipped while it is still training; `data` is the training set (its
    encoding fixes the latent normalisation exactly as training did).
    """
    run_dir = Path(run_dir)
    flow_meta = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    arch_fields = dict(flow_meta["architecture"])
    arch_fields["vae_channels"] = tuple(arch_fields["vae_channels"])
    config = T2ITrainConfig(**flow_meta["config"])
    pipe = build_pipeline(T2IArchitecture(**arch_fields), config.seed)
    _load_stage(torch.nn.ModuleDict({"vae": pipe.vae}), run_dir / "vae_checkpoint")
    normalise_latents(pipe.vae, data.images, config.seed)
    trained = torch.nn.ModuleDict(
        {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    )
    meta = _load_stage(trained, run_dir / "checkpoint")
    for module in (pipe.vae, trained):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, meta["step"]


def train_t2i(
    data: ImageSet,
    run_dir: str | Path,
    config: T2ITrainConfig | None = None,
    arch: T2IArchitecture | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the pipeline (autoencoder, then MMDiT + text encoders), resuming from `run_dir`.

    Writes `run_dir/vae_checkpoint`, `run_dir/checkpoint` (full state, resumable) and at the end
    `run_dir/pipeline` (EMA weights, a StableDiffusion3Pipeline directory). Returns the training facts.
    """
    config = config or T2ITrainConfig()
    arch = arch or T2IArchitecture()
    config.validate()
    run_dir = Path(run_dir)
    pipe = build_pipeline(arch, config.seed)
    images = data.images
    meta = {"command": command, "architecture": asdict(arch)}

    vae = pipe.vae

    def vae_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(images), (config.vae_batch_size,), generator=generator)
        return _vae_loss(vae, images[index], generator, config.kl_weight)

    vae_result = _train_stage(
        torch.nn.ModuleDict({"vae": vae}), vae_loss, config.vae_steps, config.vae_learning_rate,
        config, run_dir / "vae_checkpoint", config.seed, meta, log,
    )  # fmt: skip
    vae.requires_grad_(False)
    means, stds, shift, scale = normalise_latents(vae, images, config.seed)
    labels = data.labels

    def flow_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        draw = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        return _flow_loss(pipe, (draw - shift) * scale, labels[index], generator, config.caption_dropout)

    trained = torch.nn.ModuleDict(
        {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    )
    result = _train_stage(
        trained, flow_loss, config.steps, config.learning_rate, config, run_dir / "checkpoint",
        config.seed + 1, meta, log,
    )  # fmt: skip
    save_pipeline(pipe, run_dir / "pipeline")
    return {
        "command": command,
        "architecture": asdict(arch),
        "config": asdict(config),
        "parameters": parameter_counts(pipe),
        "vae": {"steps": vae_result.steps, "wall_time_s": round(vae_result.wall_time_s, 1),
                "final_loss": vae_result.final_loss},
        "flow": {"steps": result.steps, "wall_time_s": round(result.wall_time_s, 1),
                 "final_loss": result.final_loss},
        "latent_shift": shift,
        "latent_scale": scale,
    }  # fmt: skip
