"""Score the fmnist-vq token generator: samplers (FID vs network calls), tokenizer health, codec ladder,
quantized denoisers. Writes benchmarks/results/tokens/*.json and the shipped model's metrics.

Usage: PYTHONPATH=src python benchmarks/tokens_fmnist_vq.py RUN_DIR PART [N]
PART: tokenizer | guidance | samplers | quant | quant_low | quant_lrvq | ladder
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffquant.data import load_fashion_mnist
from diffquant.evaluation.protocol import Scorer
from diffquant.fileio import write_json
from diffquant.quant.codebook import CodebookSpec
from diffquant.tokens.codec import rate_distortion
from diffquant.tokens.generator import TokenGenerator, score_generator
from diffquant.tokens.ladder import codebook_ladder
from diffquant.tokens.quantization import quantize_token_denoiser, record_token_calibration, vq_token_denoiser
from diffquant.tokens.samplers import TokenSamplerConfig
from diffquant.tokens.storage import load_token_model
from diffquant.tokens.training import tokenizer_report

torch.set_num_threads(1)
OUT = Path(__import__("os").environ.get("TOKENS_OUT", "benchmarks/results/tokens"))
GUIDANCE = 2.0


def _generator(run: Path) -> TokenGenerator:
    return TokenGenerator(load_token_model(run / "tokenizer"), load_token_model(run / "denoiser"), "fmnist-vq")


def _log(name: str, result: dict) -> None:
    m = result["metrics"]
    print(
        f"{name}: FID {m['fid']:.2f} acc {m.get('class_accuracy', float('nan')):.3f} "
        f"calls {m['network_calls']} {m['sampling_s']:.0f}s",
        flush=True,
    )


def part_tokenizer(run: Path, n: int) -> None:
    tokenizer = load_token_model(run / "tokenizer")
    test = load_fashion_mnist("test")
    report = tokenizer_report(tokenizer, test.images)
    report.update({f"codec_{k}": v for k, v in rate_distortion(tokenizer, test.images).items()})
    write_json(OUT / "tokenizer.json", report)
    print(report)


def part_guidance(run: Path, n: int) -> None:
    gen, scorer, rows = _generator(run), Scorer.load(), []
    for scale in (1.0, 1.5, 2.0, 3.0):
        result = score_generator(gen, TokenSamplerConfig("maskgit", 8, guidance_scale=scale), n, scorer=scorer)
        _log(f"maskgit-8 cfg {scale}", result)
        rows.append(result)
        write_json(OUT / "guidance.json", rows)


def part_samplers(run: Path, n: int) -> None:
    gen, scorer, rows = _generator(run), Scorer.load(), []
    configs = [("maskgit", 8, GUIDANCE), ("fhs", 4, GUIDANCE), ("fhs", 8, GUIDANCE), ("vqdiffusion", 10, GUIDANCE)]
    configs += [("maskgit", 8, 1.0), ("fhs", 16, GUIDANCE), ("maskgit", 4, GUIDANCE)]  # if time allows
    for sampler, steps, guidance in configs:
        config = TokenSamplerConfig(sampler, steps, guidance_scale=guidance)
        result = score_generator(gen, config, n, scorer=scorer)
        _log(f"{sampler}-{steps} cfg {guidance}", result)
        rows.append(result)
        write_json(OUT / "samplers.json", rows)


def part_quant(
    run: Path,
    n: int,
    settings=(("naive", 8, 8), ("ptq4dm", 8, 8), ("naive", 4, 8)),
    vq=True,
    name="quant",
    vq_ranks=(0,),
) -> None:
    gen, scorer, rows = _generator(run), Scorer.load(), []
    sampler = TokenSamplerConfig("maskgit", 8, guidance_scale=GUIDANCE)
    started = time.perf_counter()
    calibration = record_token_calibration(gen.denoiser, sampler, 64)
    print(f"calibration: {len(calibration)} calls recorded in {time.perf_counter() - started:.0f}s", flush=True)
    for method, wbits, abits in settings:
        started = time.perf_counter()
        denoiser = quantize_token_denoiser(gen.denoiser, method, calibration, wbits=wbits, abits=abits)
        seconds = time.perf_counter() - started
        result = score_generator(TokenGenerator(gen.tokenizer, denoiser), sampler, n, scorer=scorer)
        _log(f"{method} W{wbits}A{abits}", result)
        rows.append({"method": f"{method} W{wbits}A{abits}", "quantize_s": seconds, **result})
        write_json(OUT / f"{name}.json", rows)
    for refine, rank in [(100, rank) for rank in vq_ranks] if vq else []:
        spec = CodebookSpec(refine_steps=refine, kmeans_iters=15, rank=rank)
        started = time.perf_counter()
        denoiser, report = vq_token_denoiser(gen.denoiser, spec, calibration if refine else None)
        seconds = time.perf_counter() - started
        result = score_generator(TokenGenerator(gen.tokenizer, denoiser), sampler, n, scorer=scorer)
        label = f"weight VQ 2-bit (d=4, K=256){' + VQ4DiT candidates' if refine else ''}"
        label += f" + rank-{rank} fp16 branch (LR²VQ)" if rank else ""
        _log(label, result)
        rows.append({"method": label, "quantize_s": seconds, "spec": asdict(spec), "size": report, **result})
        write_json(OUT / f"{name}.json", rows)
    # full precision last: the sampler table (same sampler, seed and N) usually has it by now
    table = json.loads((OUT / "samplers.json").read_text()) if (OUT / "samplers.json").is_file() else []
    fp = next((r for r in table if r["sampler"] == asdict(sampler)), None)
    if fp is None:  # the full-precision row from the sampler table (same sampler, seed and N) or a fresh one
        fp = score_generator(gen, sampler, n, scorer=scorer)
    _log("fp32", fp)
    rows.insert(0, {"method": "fp32", **fp})
    write_json(OUT / f"{name}.json", rows)


def part_ladder(run: Path, n: int) -> None:
    tokenizer = load_token_model(run / "tokenizer")
    train, test = load_fashion_mnist("train").subset(6000, seed=1), load_fashion_mnist("test").subset(n)
    codebook_ladder(
        tokenizer, train.images, test.images, [2**b for b in range(4, 13)], OUT / "ladder", rungs_dir=run / "ladder"
    )


def part_quant_low(run: Path, n: int) -> None:
    """W4A8 and weight VQ in a second process (the first runs W8A8)."""
    part_quant(run, n, settings=(("naive", 4, 8),), vq=True, name="quant_low")


def part_quant_lrvq(run: Path, n: int) -> None:
    """2-bit weight VQ without and with a low-rank branch (r = 4, 8) at the same index bits."""
    part_quant(run, n, settings=(), vq=True, name="quant_lrvq", vq_ranks=(0, 4, 8))


PARTS = {
    "quant_low": part_quant_low,
    "quant_lrvq": part_quant_lrvq,
    "tokenizer": part_tokenizer,
    "guidance": part_guidance,
    "samplers": part_samplers,
    "quant": part_quant,
    "ladder": part_ladder,
}

if __name__ == "__main__":
    run_dir, part = Path(sys.argv[1]), sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    PARTS[part](run_dir, count)
    print(json.dumps({"part": part, "minutes": (time.perf_counter() - started) / 60}))
