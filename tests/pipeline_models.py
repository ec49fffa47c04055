"""Tiny random StableDiffusion3Pipeline (MMDiT, AutoencoderKL, two CLIP text encoders) and FluxPipeline
(CLIP + T5 encoders) with a locally built CLIP tokenizer: nothing is downloaded."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)


def local_tokenizer(directory: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) built from scratch."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.")
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + symbols + [s + "</w>" for s in symbols]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    vocab, merges = str(directory / "vocab.json"), str(directory / "merges.txt")
    return CLIPTokenizer(vocab, merges, model_max_length=16, pad_token="!")


def _clip(seed: int, vocab: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return CLIPTextModelWithProjection(config).eval()


def _tiny_vae() -> AutoencoderKL:
    """A 16x16x1 <-> 8x8x4 autoencoder (the seed is the caller's)."""
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=16,
        shift_factor=0.0, scaling_factor=1.0,
    ).eval()


def tiny_sd3_pipeline(scratch: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    tokenizer = local_tokenizer(scratch / "tokenizer")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    ).eval()
    vae = _tiny_vae()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_clip(seed + 1, len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_clip(seed + 2, len(tokenizer)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(scratch: Path, seed: int = 0) -> FluxPipeline:
    """Flux: a CLIP pooled encoder and a T5 encoder (read through the same local tokenizer), packed latents."""
    tokenizer = local_tokenizer(scratch / "tokenizer")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = _tiny_vae()
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1,
            pad_token_id=2,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
    )
