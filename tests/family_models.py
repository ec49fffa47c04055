"""Tiny seeded random instances of every model family diffquant has an adapter for (seconds to build)."""

from __future__ import annotations

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)
from torch import nn


def _unet() -> nn.Module:
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16,
    )


def _sd_unet(sdxl: bool = False) -> nn.Module:
    extra = (
        dict(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 24)
        if sdxl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=8, norm_num_groups=8, **extra,
    )


def _dit() -> nn.Module:
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    )


def _pixart() -> nn.Module:
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
    )


def _sana() -> nn.Module:
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=1,
    )


def _sd3() -> nn.Module:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=8,
    )


def _flux() -> nn.Module:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )


def _wan() -> nn.Module:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )


def _qwen() -> nn.Module:
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
    )


BUILDERS = {
    "unet": _unet,
    "sd-unet": _sd_unet,
    "sdxl-unet": lambda: _sd_unet(sdxl=True),
    "dit": _dit,
    "pixart": _pixart,
    "sana": _sana,
    "sd3": _sd3,
    "flux": _flux,
    "wan": _wan,
    "qwenimage": _qwen,
}


def build_family(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


# --- the method x setting x family matrix (tests/test_families.py, benchmarks/families_matrix.py) ---

METHODS = ("naive", "ptq4dm", "qdiffusion", "tfmq", "edadm")
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8)}
TINY_OPTIONS = {
    "qdiffusion": {"reconstruction": {"weight_iters": 4, "act_iters": 2, "batch_size": 8}},
    "tfmq": {"reconstruction": {"weight_iters": 4, "act_iters": 2, "batch_size": 8}},
    "edadm": {"reconstruction": {"weight_iters": 4, "act_iters": 2, "batch_size": 8}},
}


def family_model(name: str, seed: int = 0):
    """A tiny family instance as a DiffusionModel (DDPM schedule for UNets/DiTs; flow families infer theirs)."""
    from diffquant.families import adapter_for
    from diffquant.model import DDPM_LINEAR_SCHEDULE, DiffusionModel, ModelInfo

    denoiser = build_family(name, seed)
    adapter = adapter_for(denoiser)
    schedule = None if adapter.flow_matching else dict(DDPM_LINEAR_SCHEDULE)
    info = ModelInfo(
        f"tiny-{name}",
        adapter.name,
        adapter.latent_shape(denoiser.config),
        num_classes=adapter.num_classes(denoiser.config),
        dataset="random",
    )
    return DiffusionModel(denoiser, info, schedule)


def family_inputs(model, per_step: int = 8, seed: int = 1):
    """Denoiser inputs at three sampling steps, as a CalibrationSet (the user's own inputs, README-style)."""
    from diffquant.calibration import CalibrationSet
    from diffquant.calibration.dataset import select_rows

    generator = torch.Generator().manual_seed(seed)
    count = 3 * per_step
    sample, _, conditioning = model.adapter.example_inputs(model.denoiser, count, generator)
    step_index = torch.arange(3).repeat_interleave(per_step)
    timestep = torch.tensor([900.0, 500.0, 100.0])[step_index]
    order = torch.arange(count)
    return CalibrationSet(sample, timestep, step_index, select_rows(conditioning, order), num_steps=3)


@torch.no_grad()
def outputs(model, data) -> list[torch.Tensor]:
    from diffquant.calibration import call_denoiser

    return [call_denoiser(model.denoiser, batch) for batch in data.batches(64)]


def relative_mse(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    errors = sum((a - b).pow(2).sum().item() for a, b in zip(reference, candidate, strict=True))
    return errors / sum(a.pow(2).sum().item() for a in reference)


def matrix_row(family: str, method: str, setting: str, directory) -> dict:
    """Quantize one tiny family instance and measure: coverage, error vs fp on fresh inputs, save->load
    identity, agreement of the oneDNN export with the simulation."""
    import diffquant
    from diffquant.modules.surgery import export_plans
    from diffquant.runtime.export import export_model

    model = family_model(family)
    total = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.denoiser.modules())
    wbits, abits = SETTINGS[setting]
    calibration = family_inputs(model)
    quantized = diffquant.quantize(
        model, method, calibration, progress=False, wbits=wbits, abits=abits, **TINY_OPTIONS.get(method, {})
    )
    fresh = family_inputs(model, per_step=4, seed=99)
    reference, simulated = outputs(model, fresh), outputs(quantized, fresh)
    diffquant.save(quantized, directory)
    reloaded = diffquant.load(directory)
    again = outputs(reloaded, fresh)
    # at-load decoding is the exact deployment of weight-only layers (the packed default computes in bf16)
    exported = outputs(export_model(reloaded, "onednn", weight_only_mode="at-load"), fresh)
    return {
        "family": family,
        "method": method,
        "setting": setting,
        "quantized": len(export_plans(quantized.denoiser)["layers"]),  # a split conv counts once
        "total": total,
        "rel_error": relative_mse(reference, simulated),
        "reload_identical": all(torch.equal(a, b) for a, b in zip(simulated, again, strict=True)),
        "export_rel_error": relative_mse(simulated, exported),
    }
