"""GGUF export: a quantized denoiser as one GGUF file that diffusers, ComfyUI-GGUF and ggml tools read.

Layouts:
* `original` - the tensor names of the model's original (non-diffusers) checkpoint, as the GGUF files
  that diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` and
  ComfyUI-GGUF load (SD/SDXL UNet: `model.diffusion_model.input_blocks.*`, SD3: `joint_blocks.*`, Flux:
  `double_blocks.*`/`single_blocks.*`, fused QKV). The mappings below are the inverses of diffusers'
  `convert_ldm_unet_checkpoint`, `convert_sd3_transformer_checkpoint_to_diffusers` and
  `convert_flux_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py).
* `diffusers` - the model's own state-dict names (any diffusers model; diffusers' single-file loader
  takes such a file as it is for the families it knows; for the others, e.g. UNet2DModel and
  DiTTransformer2DModel, `read_gguf`/`load_gguf_denoiser` here read it back).

Linear weights on a GGUF grid (a method run with `weight_grid='q4_0'`, ...) are written from their own
codes and fp16 scales: nothing is rounded again. Float linear weights are rounded to `float_type`'s
block type by ggml's round-to-nearest when one is given. Convolutions are written in float32 in the
`original` layout (diffusers dequantizes only linears); in the `diffusers` layout their rows are
flattened (out, in*kh*kw) with the original shape in `comfy.gguf.orig_shape.<name>` as ComfyUI-GGUF
does. Everything else (biases, norms, embeddings) is float32. GGUF holds weights only: activation
quantizers, per-step parameters and split-shortcut halves do not survive (split convs are joined).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from torch import nn

from diffquant.errors import ConfigError, DiffquantError
from diffquant.modules.kinds import is_kind
from diffquant.modules.layers import QuantLayer
from diffquant.quant import gguf_blocks
from diffquant.quant.gguf_blocks import BLOCK_SIZE, BlockType, block_type

LAYOUTS = ("auto", "original", "diffusers")
ARCHITECTURES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
"""general.architecture values ComfyUI-GGUF recognises, for the families with an original layout."""
SMALL_TENSOR = 1024
"""Float tensors with fewer elements stay unquantized (city96's convert.py rule)."""


def _gguf_module():
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - gguf is a core dependency
        raise DiffquantError("GGUF export needs the 'gguf' package: pip install gguf.") from error
    return gguf


# --- tensors ready for the file ------------------------------------------------------------------
@dataclass
class BlockTensor:
    """A 2-D tensor on a GGUF block grid: codes (rows, blocks, 32), scales (rows, blocks)."""

    kind: BlockType
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    shape: tuple[int, ...]
    """The logical shape (a conv weight keeps its 4-D shape; its rows are flattened)."""

    def dequantize(self) -> torch.Tensor:
        flat = gguf_blocks.dequantize(
            self.codes.reshape(-1, BLOCK_SIZE), self.d.reshape(-1), self.m.reshape(-1), self.kind
        )
        return flat.reshape(self.shape)

    def raw(self) -> np.ndarray:
        rows = self.codes.shape[0]
        encoded = gguf_blocks.encode(
            self.codes.reshape(-1, BLOCK_SIZE), self.d.reshape(-1), self.m.reshape(-1), self.kind
        )
        return encoded.reshape(rows, -1).numpy()


@dataclass
class ExportReport:
    """What the export did with each tensor."""

    path: str
    layout: str
    architecture: str
    tensors: dict[str, str] = field(default_factory=dict)
    """Tensor name -> its GGUF type (q4_0, f32, ...)."""
    ours: list[str] = field(default_factory=list)
    """Weights written from the method's own codes (no re-rounding)."""
    rounded: list[str] = field(default_factory=list)
    """Float weights rounded to nearest by ggml's rule here."""
    dequantized: list[str] = field(default_factory=list)
    """Quantized weights written in float32 (convolutions in the original layout, mixed fusions)."""
    file_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": self.layout,
            "architecture": self.architecture,
            "file_bytes": self.file_bytes,
            "types": _count(self.tensors.values()),
            "ours": len(self.ours),
            "rounded": len(self.rounded),
            "dequantized": self.dequantized,
        }


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _layer_entry(layer: QuantLayer, name: str) -> BlockTensor | torch.Tensor:
    """A quantized layer's weight: its own codes when they sit on a GGUF grid, else float values."""
    quantizer = layer.weight_quantizer
    if quantizer is None or not layer.frozen:
        return layer.weight.detach().float()
    spec = quantizer.spec
    if spec.gguf is None:
        raise DiffquantError(
            f"Layer '{name}' is quantized as {spec.describe()}, which GGUF cannot hold: quantize with "
            "weight_grid='q8_0'|'q5_0'|'q4_0' (--option weight_grid=q4_0), or export the float model with "
            "--gguf-type."
        )
    kind = block_type(spec.gguf)
    shape = tuple(layer._frozen_shape)
    scale = quantizer.scale.detach().float().reshape(-1)
    d = torch.where(scale == gguf_blocks.ZERO_SCALE_STANDIN, torch.zeros_like(scale), scale)
    if not torch.equal(gguf_blocks.to_half(d), d):
        raise DiffquantError(
            f"Layer '{name}' has scales that are not fp16 values: its grid was changed after calibration."
        )
    rows = shape[0]
    codes = layer.weight_codes.to(torch.int64).reshape(rows, -1, BLOCK_SIZE)
    return BlockTensor(kind, codes, d.reshape(rows, -1), torch.zeros(rows, codes.shape[1]), shape)


def _joined_entry(module: nn.Module, name: str) -> BlockTensor | torch.Tensor:
    """A layer kind's weight in the float layout. Its weight pieces (a split conv's halves) lie side by side:
    each row is [first piece's inputs, next piece's inputs, ...], so when all pieces sit on one GGUF grid and
    each piece's rows are whole blocks, the blocks simply follow each other."""
    pieces = module.weight_pieces()
    if not pieces:  # no concatenation of quantized layers: the kind computes its float weight
        return module.joined_weight()
    entries = [_layer_entry(layer, f"{name}.{part}" if part else name) for part, layer in pieces.items()]
    if len(entries) == 1:
        return entries[0]
    first = entries[0]
    if all(isinstance(entry, BlockTensor) and entry.kind == first.kind for entry in entries):
        shape = (first.shape[0], sum(entry.shape[1] for entry in entries), *first.shape[2:])
        return BlockTensor(
            first.kind,
            torch.cat([entry.codes for entry in entries], 1),
            torch.cat([entry.d for entry in entries], 1),
            torch.cat([entry.m for entry in entries], 1),
            shape,
        )
    values = [entry.dequantize() if isinstance(entry, BlockTensor) else entry for entry in entries]
    return torch.cat(values, 1).detach()


def _round_float(values: torch.Tensor, kind: BlockType) -> BlockTensor:
    rows = values.shape[0]
    flat = values.reshape(rows, -1)
    codes, d, m = gguf_blocks.rtn_codes(flat.reshape(-1, BLOCK_SIZE), kind)
    return BlockTensor(
        kind, codes.reshape(rows, -1, BLOCK_SIZE), d.reshape(rows, -1), m.reshape(rows, -1), tuple(values.shape)
    )


def float_state_names(denoiser: nn.Module) -> list[str]:
    """The state-dict names of the denoiser's float architecture (built on the meta device)."""
    with torch.device("meta"):
        return list(type(denoiser).from_config(denoiser.config).state_dict())


def diffusers_tensors(denoiser: nn.Module) -> dict[str, BlockTensor | torch.Tensor]:
    """The denoiser's float state-dict names, each with its GGUF-grid weight or its float value."""
    tensors: dict[str, BlockTensor | torch.Tensor] = {}
    for key in float_state_names(denoiser):
        module_name, _, attribute = key.rpartition(".")
        module = denoiser.get_submodule(module_name) if module_name else denoiser
        if is_kind(module) and attribute == "weight":  # joined again: GGUF knows no layer kinds
            tensors[key] = _joined_entry(module, module_name)
        elif is_kind(module) and attribute == "bias":
            tensors[key] = module.joined_bias()
        else:
            tensors[key] = getattr(module, attribute).detach()
    return tensors


# --- the original layouts --------------------------------------------------------------------------
@dataclass(frozen=True)
class Fusion:
    """One original tensor made of diffusers tensors concatenated along rows (optionally halves swapped)."""

    original: str
    parts: tuple[str, ...]
    swap: bool = False


def _sd3_fusions(keys: set[str], config: dict[str, Any]) -> list[Fusion]:
    renames = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    block = {
        "attn.norm_q": "x_block.attn.ln_q",
        "attn.norm_k": "x_block.attn.ln_k",
        "attn.norm_added_q": "context_block.attn.ln_q",
        "attn.norm_added_k": "context_block.attn.ln_k",
        "attn.to_out.0": "x_block.attn.proj",
        "attn.to_add_out": "context_block.attn.proj",
        "attn2.norm_q": "x_block.attn2.ln_q",
        "attn2.norm_k": "x_block.attn2.ln_k",
        "attn2.to_out.0": "x_block.attn2.proj",
        "norm1.linear": "x_block.adaLN_modulation.1",
        "norm1_context.linear": "context_block.adaLN_modulation.1",
        "ff.net.0.proj": "x_block.mlp.fc1",
        "ff.net.2": "x_block.mlp.fc2",
        "ff_context.net.0.proj": "context_block.mlp.fc1",
        "ff_context.net.2": "context_block.mlp.fc2",
    }
    fused = {
        "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    }
    blocks = sorted({int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks.")})
    last = blocks[-1] if blocks else -1
    fusions = [Fusion("pos_embed", ("pos_embed.pos_embed",))]
    for source, target in renames.items():
        fusions += [Fusion(f"{target}.{p}", (f"{source}.{p}",)) for p in ("weight", "bias")]
    fusions += [
        Fusion(f"final_layer.adaLN_modulation.1.{p}", (f"norm_out.linear.{p}",), swap=True) for p in ("weight", "bias")
    ]
    for i in blocks:
        here, there = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for source, target in block.items():
            swap = i == last and source == "norm1_context.linear"  # the last context block's adaLN is swapped
            fusions += [Fusion(f"{there}{target}.{p}", (f"{here}{source}.{p}",), swap) for p in ("weight", "bias")]
        for target, parts in fused.items():
            fusions += [
                Fusion(f"{there}{target}.{p}", tuple(f"{here}{s}.{p}" for s in parts)) for p in ("weight", "bias")
            ]
    return fusions


def _flux_fusions(keys: set[str], config: dict[str, Any]) -> list[Fusion]:
    renames = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    double = {
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
    }
    double_norms = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
        "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    }
    fusions = [
        Fusion(f"final_layer.adaLN_modulation.1.{p}", (f"norm_out.linear.{p}",), swap=True) for p in ("weight", "bias")
    ]
    for source, target in renames.items():
        fusions += [Fusion(f"{target}.{p}", (f"{source}.{p}",)) for p in ("weight", "bias")]
    for i in sorted({int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks.")}):
        here, there = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for source, target in double.items():
            fusions += [Fusion(f"{there}{target}.{p}", (f"{here}{source}.{p}",)) for p in ("weight", "bias")]
        fusions += [Fusion(there + target, (here + source,)) for source, target in double_norms.items()]
        for target, parts in {
            "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        }.items():
            fusions += [
                Fusion(f"{there}{target}.{p}", tuple(f"{here}{s}.{p}" for s in parts)) for p in ("weight", "bias")
            ]
    for i in sorted({int(k.split(".")[1]) for k in keys if k.startswith("single_transformer_blocks.")}):
        here, there = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            fusions.append(Fusion(f"{there}modulation.lin.{p}", (f"{here}norm.linear.{p}",)))
            fusions.append(Fusion(f"{there}linear2.{p}", (f"{here}proj_out.{p}",)))
            parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            fusions.append(Fusion(f"{there}linear1.{p}", tuple(f"{here}{s}.{p}" for s in parts)))
        fusions.append(Fusion(f"{there}norm.query_norm.scale", (f"{here}attn.norm_q.weight",)))
        fusions.append(Fusion(f"{there}norm.key_norm.scale", (f"{here}attn.norm_k.weight",)))
    return fusions


LDM_PREFIX = "model.diffusion_model."
_LDM_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")


def _ldm_resnet(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{_LDM_RESNET.get(module, module)}.{tail}"


def _ldm_unet_name(key: str, per_block: int, attention_levels: set[int]) -> str | None:
    """The original (LDM) name of a UNet2DConditionModel tensor; the inverse of diffusers'
    convert_ldm_unet_checkpoint (input/middle/output blocks, resnet sub-layer names)."""
    module, _, parameter = key.rpartition(".")
    if module in _LDM_TOP:
        return f"{_LDM_TOP[module]}.{parameter}"
    if key.startswith("mid_block."):
        kind, index, rest = key.removeprefix("mid_block.").split(".", 2)
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_ldm_resnet(rest)}"
        return f"middle_block.1.{rest}"
    match = _UNET_KEY.match(key)
    if match is None:
        return None
    side, block, kind, index, rest = match.groups()
    block, index, width = int(block), int(index), per_block + 1
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{width * (block + 1)}.0.op.{rest.removeprefix('conv.')}"
        layer = width * block + index + 1
    else:
        if kind == "upsamplers":
            return f"output_blocks.{width * block + per_block}.{2 if block in attention_levels else 1}.{rest}"
        layer = width * block + index
    return f"{side.replace('down_blocks', 'input_blocks').replace('up_blocks', 'output_blocks')}.{layer}." + (
        f"0.{_ldm_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
    )


def _ldm_unet_fusions(keys: set[str], config: dict[str, Any]) -> list[Fusion]:
    per_block = config.get("layers_per_block", 2)
    if not isinstance(per_block, int):
        raise ConfigError(
            "The original SD UNet layout needs one layers_per_block for all blocks; use layout='diffusers'."
        )
    attention_levels = {int(k.split(".")[1]) for k in keys if k.startswith("up_blocks.") and ".attentions." in k}
    fusions = []
    for key in sorted(keys):
        name = _ldm_unet_name(key, per_block, attention_levels)
        if name is not None:
            fusions.append(Fusion(LDM_PREFIX + name, (key,)))
    return fusions


FUSIONS = {
    "SD3Transformer2DModel": _sd3_fusions,
    "FluxTransformer2DModel": _flux_fusions,
    "UNet2DConditionModel": _ldm_unet_fusions,
}


def _swap_halves(entry: BlockTensor | torch.Tensor) -> BlockTensor | torch.Tensor:
    """diffusers' swap_scale_shift: exchange the two row halves (its own inverse)."""
    if isinstance(entry, BlockTensor):
        half = entry.codes.shape[0] // 2
        order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
        return BlockTensor(entry.kind, entry.codes[order], entry.d[order], entry.m[order], entry.shape)
    first, second = entry.chunk(2, 0)
    return torch.cat([second, first], 0)


def _join(parts: list[BlockTensor | torch.Tensor]) -> tuple[BlockTensor | torch.Tensor, bool]:
    """Concatenate along rows; (tensor, dequantized) - parts on different grids are joined in float."""
    if len(parts) == 1:
        return parts[0], False
    kinds = {part.kind.name if isinstance(part, BlockTensor) else None for part in parts}
    if len(kinds) == 1 and None not in kinds:
        first = parts[0]
        rows = sum(p.shape[0] for p in parts)
        return BlockTensor(
            first.kind,
            torch.cat([p.codes for p in parts]),
            torch.cat([p.d for p in parts]),
            torch.cat([p.m for p in parts]),
            (rows, *first.shape[1:]),
        ), False
    values = [p.dequantize() if isinstance(p, BlockTensor) else p for p in parts]
    return torch.cat(values), any(isinstance(p, BlockTensor) for p in parts)


def to_original_layout(
    class_name: str, tensors: dict[str, BlockTensor | torch.Tensor], config: dict[str, Any] | None = None
) -> tuple[dict[str, BlockTensor | torch.Tensor], list[str]]:
    """Rename and fuse diffusers tensors into the original checkpoint layout; also the names joined in float."""
    if class_name not in FUSIONS:
        raise ConfigError(
            f"No original GGUF layout for {class_name} (known: {', '.join(FUSIONS)}); use layout='diffusers'."
        )
    fusions = FUSIONS[class_name](set(tensors), dict(config or {}))
    fusions = [f for f in fusions if all(p in tensors for p in f.parts)]
    used = {p for f in fusions for p in f.parts}
    missing = sorted(set(tensors) - used)
    if missing:
        raise DiffquantError(f"{class_name} tensors without an original name: {missing[:5]}.")
    result: dict[str, BlockTensor | torch.Tensor] = {}
    joined_in_float: list[str] = []
    for fusion in fusions:
        entry, dequantized = _join([tensors[p] for p in fusion.parts])
        if dequantized:
            joined_in_float.append(fusion.original)
        result[fusion.original] = _swap_halves(entry) if fusion.swap else entry
    return result, joined_in_float


# --- writing ---------------------------------------------------------------------------------------
def export_gguf(
    model: Any,
    path: str | Path,
    float_type: str | None = None,
    layout: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> ExportReport:
    """Write `model` (a DiffusionModel or a diffusers denoiser) as a GGUF file.

    float_type: block type (q8_0, q5_0, q5_1, q4_0, q4_1) for linear weights that are still float;
    None keeps them float32. layout: 'original' (SD3, Flux), 'diffusers', or 'auto' (original when
    the family has one).
    """
    gguf = _gguf_module()
    denoiser = getattr(model, "denoiser", model)
    class_name = type(denoiser).__name__
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown GGUF layout '{layout}'. Choose one of: {', '.join(LAYOUTS)}.")
    if layout == "auto":
        layout = "original" if class_name in FUSIONS else "diffusers"
    kind = block_type(float_type) if float_type else None
    tensors = diffusers_tensors(denoiser)
    linears = {n + ".weight" for n, m in denoiser.named_modules() if isinstance(m, nn.Linear | QuantLayer)}
    linears -= {n + ".weight" for n, m in denoiser.named_modules() if _is_conv(m)}
    convs = {n + ".weight" for n, m in denoiser.named_modules() if _is_conv(m)}
    architecture = ARCHITECTURES.get(class_name, f"diffquant.{class_name}")
    if class_name == "UNet2DConditionModel":  # ComfyUI-GGUF's names for SD 1.x/2.x and SDXL UNets
        architecture = "sdxl" if denoiser.config.get("addition_embed_type") == "text_time" else "sd1"
    report = ExportReport(str(path), layout, architecture)
    for key, entry in list(tensors.items()):
        if isinstance(entry, BlockTensor):
            report.ours.append(key)
            if layout == "original" and key in convs:  # diffusers dequantizes only linears
                tensors[key] = entry.dequantize()
                report.dequantized.append(key)
        elif kind is not None and _roundable(key, entry, linears, convs, layout):
            tensors[key] = _round_float(entry.float(), kind)
            report.rounded.append(key)
    if layout == "original":
        tensors, joined = to_original_layout(class_name, tensors, dict(denoiser.config))
        report.dequantized += joined
    writer = gguf.GGUFWriter(str(path), report.architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    config = {"_class_name": class_name, **dict(denoiser.config)}
    writer.add_string("diffquant.config", json.dumps(config, default=str))
    writer.add_string("diffquant.layout", layout)
    writer.add_string("diffquant.metadata", json.dumps(metadata or _quantization_facts(model), default=str))
    for name, entry in tensors.items():
        if isinstance(entry, BlockTensor):
            if len(entry.shape) != 2:  # ComfyUI-GGUF's convention for reshaped tensors
                writer.add_array(f"comfy.gguf.orig_shape.{name}", list(entry.shape))
            writer.add_tensor(name, entry.raw(), raw_dtype=gguf.GGMLQuantizationType(entry.kind.ggml_type))
            report.tensors[name] = entry.kind.name
        else:
            writer.add_tensor(name, entry.detach().float().contiguous().numpy())
            report.tensors[name] = "f32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report.file_bytes = Path(path).stat().st_size
    return report


def _is_conv(module: nn.Module) -> bool:
    quantized = isinstance(module, QuantLayer) and issubclass(module.float_type, nn.Conv2d)
    return isinstance(module, nn.Conv2d) or quantized


def _roundable(key: str, value: torch.Tensor, linears: set[str], convs: set[str], layout: str) -> bool:
    """Float weights that ggml's RTN may round: linear rows (and conv rows in our own layout) of 32-blocks."""
    if value.numel() < SMALL_TENSOR or value.ndim < 2:
        return False
    if key in linears or (key in convs and layout == "diffusers"):
        return value.reshape(value.shape[0], -1).shape[1] % BLOCK_SIZE == 0
    return False


def _quantization_facts(model: Any) -> dict[str, Any]:
    record = getattr(model, "quantization", None) or {}
    return {k: record[k] for k in ("method", "config", "setting") if k in record}


# --- reading ---------------------------------------------------------------------------------------
def _field_string(reader, key: str) -> str | None:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    return bytes(field_.parts[field_.data[0]]).decode()


def _field_ints(reader, key: str) -> list[int] | None:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    return [int(field_.parts[i][0]) for i in field_.data]


def read_gguf(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Dequantize every tensor of a GGUF file (our decoder) and return them with diffquant's metadata."""
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise DiffquantError(f"Cannot read GGUF file {path}: {error}.") from error
    kinds = {kind.ggml_type: kind for kind in gguf_blocks.BLOCK_TYPES.values()}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        raw = torch.from_numpy(np.array(tensor.data))
        code = int(tensor.tensor_type)
        if code in kinds:
            values = gguf_blocks.dequantize_rows(raw, kinds[code])
        elif code in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = raw.float()
        else:
            raise DiffquantError(
                f"{path}: tensor '{tensor.name}' has GGUF type {tensor.tensor_type.name}, not read here."
            )
        shape = _field_ints(reader, f"comfy.gguf.orig_shape.{tensor.name}")
        tensors[tensor.name] = values.reshape(shape) if shape else values
    facts = {
        "config": json.loads(_field_string(reader, "diffquant.config") or "{}"),
        "layout": _field_string(reader, "diffquant.layout"),
        "architecture": _field_string(reader, "general.architecture"),
        "types": _count(t.tensor_type.name.lower() for t in reader.tensors),
    }
    return tensors, facts


def load_gguf_denoiser(path: str | Path) -> nn.Module:
    """A float diffusers denoiser holding the dequantized weights of a `diffusers`-layout GGUF file."""
    tensors, facts = read_gguf(path)
    config = dict(facts["config"])
    model_class = getattr(diffusers, config.pop("_class_name", ""), None)
    if model_class is None or facts["layout"] != "diffusers":
        raise DiffquantError(
            f"{path} was not written by diffquant in the diffusers layout; load original-layout files with "
            "diffusers' from_single_file."
        )
    denoiser = model_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    try:
        denoiser.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise DiffquantError(f"The tensors in {path} do not fit {model_class.__name__}: {error}") from error
    return denoiser.eval()
