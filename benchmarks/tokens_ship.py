"""Ship fmnist-vq: weights, a class grid, metrics.json and the model card, from a run and its bench results.

Usage: PYTHONPATH=src python benchmarks/tokens_ship.py RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffquant.fileio import write_json
from diffquant.sampling import save_image_grid
from diffquant.tokens.generator import TokenGenerator
from diffquant.tokens.samplers import TokenSamplerConfig
from diffquant.tokens.storage import load_token_model
from diffquant.zoo.registry import WEIGHTS_DIR

RESULTS = Path("benchmarks/results/tokens")
UNET_FID_N5000 = 22.16


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(run: Path) -> None:
    torch.set_num_threads(1)
    target = WEIGHTS_DIR / "fmnist-vq"
    tokenizer, denoiser = load_token_model(run / "tokenizer"), load_token_model(run / "denoiser")
    summary = json.loads((run / "summary.json").read_text())
    tok_meta = json.loads((run / "tokenizer" / "config.json").read_text())["training"]
    generator = TokenGenerator(tokenizer, denoiser, "fmnist-vq")
    tok_report, samplers, quant, guidance, large_n = (
        _load(n) for n in ("tokenizer.json", "samplers.json", "quant.json", "guidance.json", "maskgit_n5000.json")
    )
    if large_n is not None:  # `diffquant tokens eval -n 5000` of the default sampler, beside the N=1000 table
        default = {"sampler": "maskgit", "steps": 8, "guidance_scale": 2.0}
        samplers = [*(samplers or []), {"sampler": default, **large_n}]
    ladder = _load("ladder/rd.json")
    # W8A8 and low-bit rows ran in two processes; the full-precision row is the sampler table's
    rows = [r for r in (_load("quant.json") or []) if r["method"] != "fp32"]
    fp = next(
        (
            r
            for r in samplers or []
            if r["sampler"]["sampler"] == "maskgit"
            and r["sampler"]["steps"] == 8
            and r["sampler"]["guidance_scale"] == 2.0
        ),
        None,
    )
    quant = ([{"method": "fp32", **fp}] if fp else []) + rows
    card = {
        "description": "Class-conditional token generator on Fashion-MNIST: 7x7 VQ tokens (K=256), "
        "bidirectional transformer denoiser with a learned null class.",
        "parameters": {
            "tokenizer": sum(p.numel() for p in tokenizer.parameters()),
            "denoiser": sum(p.numel() for p in denoiser.parameters()),
        },
        "training": {
            "command": json.loads((run / "model" / "diffquant.json").read_text())["training"]["command"],
            "note": "2 shared CPU cores, 1 torch thread, nice 2; the tokenizer stage ran first under the same "
            "settings, then the denoiser stage was restarted on the saved tokenizer (the recipe reuses it)",
            "tokenizer_width": tokenizer.config.width,
            "tokenizer_steps": tok_meta["steps"],
            "tokenizer_minutes": tok_meta["minutes"],
            "denoiser_steps": summary["denoiser"]["steps"],
            "denoiser_minutes": summary["denoiser"]["minutes"],
        },
        "tokenizer": tok_report,
        "samplers": samplers,
        "guidance": guidance,
        "quantization": quant,
        "ladder": ladder,
    }
    generator.save(target, {"training": card["training"]})
    write_json(target / "metrics.json", card)
    best = TokenSamplerConfig("maskgit", 8, guidance_scale=2.0)
    images, _ = generator.generate(100, best, labels=torch.arange(100) // 10, seed=0)
    save_image_grid(images, target / "samples.png", columns=10)
    (target / "README.md").write_text(_card_text(card))
    print(f"shipped to {target}")


def _card_text(card: dict) -> str:
    t, tr = card["tokenizer"] or {}, card["training"]
    lines = [
        "# fmnist-vq",
        "",
        card["description"] + " Trained by us on CPU (2 shared cores, 1 torch thread).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | tokenizer {card['parameters']['tokenizer']:,}, denoiser {card['parameters']['denoiser']:,} |",
        f"| tokenizer | EMA VQ (decay 0.99, k-means init, dead-code restarts), K=256, D=32, "
        f"width {tr['tokenizer_width']} (x2 at 7x7), "
        f"{tr['tokenizer_steps']} steps x 64 images, {tr['tokenizer_minutes']:.1f} min |",
        f"| denoiser | d=128, 4 layers, 4 heads; {tr['denoiser_steps']} steps x 128 token grids, "
        f"{tr['denoiser_minutes']:.1f} min; EMA 0.995; 10% label drop |",
        f"| codebook usage (test set) | {_fmt(100 * t.get('usage', float('nan')), 1)} % of K "
        f"(>= 10 uses: {_fmt(100 * t.get('usage_10', float('nan')), 1)} %) |",
        f"| perplexity | {_fmt(t.get('perplexity'), 1)} of 256 |",
        f"| reconstruction PSNR (10k test) | {_fmt(t.get('psnr'))} dB, SSIM {_fmt(t.get('codec_ssim'), 3)} |",
        f"| rate | {_fmt(t.get('codec_bpp_raw'), 3)} bpp raw indices, "
        f"{_fmt(t.get('codec_bpp_coded'), 3)} bpp arithmetic-coded (counted bytes) |",
        "",
        "Training command:",
        "",
        "```bash",
        tr["command"],
        "```",
        "",
        "## Samplers: FID against network calls",
        "",
        "Class-balanced samples, CFG 2.0 with the learned null class (a guided call counts twice), "
        "FID on the shipped feature network (the continuous models' `Scorer`), fmnist-unet: FID "
        f"{UNET_FID_N5000} at N=5000.",
        "",
        "| sampler | steps | CFG | network calls | N | FID | class accuracy | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in card["samplers"] or []:
        m, s = row["metrics"], row["sampler"]
        lines.append(
            f"| {s['sampler']} | {s['steps']} | {s['guidance_scale']} | {m['network_calls']} | {m['num_samples']} | "
            f"{m['fid']:.2f} | "
            f"{m.get('class_accuracy', float('nan')):.3f} | {m['sampling_s']:.0f} |"
        )
    lines += [
        "",
        "## Quantized denoisers (MaskGIT 8 steps, CFG 2.0)",
        "",
        "N = 1000, same seeds; weight VQ covers the 16 transformer-block linears (head and embeddings stay fp32).",
        "",
        "| method | FID | FID / fp32 | class accuracy | quantized-layer size vs fp32 |",
        "|---|---|---|---|---|",
    ]
    rows = card["quantization"] or []
    fp_fid = rows[0]["metrics"]["fid"] if rows and rows[0]["method"] == "fp32" else float("nan")
    for row in rows:
        m = row["metrics"]
        size = row.get("size", {}).get("compression")
        lines.append(
            f"| {row['method']} | {m['fid']:.2f} | {m['fid'] / fp_fid:.3f} | "
            f"{m.get('class_accuracy', float('nan')):.3f} | {'-' if size is None else f'{size:.1f}x smaller'} |"
        )
    lines += [
        "",
        "## Samples",
        "",
        "![samples](samples.png)",
        "",
        "MaskGIT 8 steps, CFG 2.0, one class per row, seed 0.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
