"""Attention kernels at the real-size models' shapes, timed side by side on this CPU.

    python benchmarks/attention_kernels.py                     # every shape, 2 threads
    python benchmarks/attention_kernels.py --shapes mmdit --out attention.json

Why: at real size the attention is a third of a W8A8 call (profile of a 2-block MMDiT at width 1536:
int8 GEMMs 154 ms, flash attention 111 ms), and OpenVINO's int8 MMDiT ran 1.48x ahead of ours on a CPU
without AMX. This isolates the attention: PyTorch's flash SDPA (what diffquant's and PT2E's exports run)
in fp32 and bf16, the same computation written out (QK^T, softmax, PV) compiled in bf16, OpenVINO's
ScaledDotProductAttention in f32 and bf16 (skipped with a note where `openvino` is not installed), and
the QK^T product alone in bf16 and on int8 (`torch._int_mm` per head, the integer-attention processor's
GEMM) to show what an integer attention could gain. Medians of interleaved rounds; ratios against
PyTorch's fp32 SDPA from the same run.

The `openvino` backend's own attention (`OpenVINOAttention`, bf16 hint) is timed in the four forms a
method can ask for: symmetric or zero-point Q/K/V grids, float or 8-bit probabilities, each taking the
operands in the models' token layout (heads split inside, as diffusers' processors do). These compute
the quantized attention, not the float one: they are checked against their simulation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.fileio import write_json
from diffquant.profiling import host_label, interleaved_medians

sys.path.insert(0, str(Path(__file__).parent))
from realsize_speed import positive  # noqa: E402 - the benchmarks' shared argument type, beside this script

# (tokens, heads, head dim) of one attention call at batch 1
SHAPES = {
    "mmdit": (1024 + 154, 24, 64),  # SD3-style joint attention: 32x32 latent patches + 154 text tokens
    "pixart": (1024, 16, 72),  # PixArt-alpha-512 self-attention
    "sd-unet": (4096, 8, 40),  # SD-1.5's first level: 64x64 latent, 320 channels
}


# the openvino backend's deployed attention: (label, symmetric Q/K/V grids, probability bits)
INT8_FORMS = [
    ("openvino backend int8, symmetric Q/K/V, float probs", True, None),
    ("openvino backend int8, symmetric Q/K/V, 8-bit probs", True, 8),
    ("openvino backend int8, zero-point Q/K/V, float probs", False, None),
    ("openvino backend int8, zero-point Q/K/V, 8-bit probs", False, 8),
]


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.softmax(-1) @ v


def openvino_sdpa(q: torch.Tensor, precision: str, threads: int) -> Callable[[], torch.Tensor]:
    """OpenVINO's attention on (q, q, q)."""
    import openvino as ov

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    model = ov.convert_model(Sdpa(), example_input=(q, q, q))
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    compiled = ov.Core().compile_model(model, "CPU", config)
    arrays = [q.numpy(), q.numpy(), q.numpy()]
    return lambda: torch.from_numpy(compiled(arrays)[0])


def quantized_processor(q: torch.Tensor, symmetric: bool, probs_bits: int | None):
    """A QuantAttnProcessor with 8-bit Q/K/V grids (and `probs_bits` probabilities) calibrated on (q, q, q)."""
    from diffquant.modules.attention import QuantAttnProcessor
    from diffquant.quant import QuantSpec

    probs = QuantSpec(f"uint{probs_bits}") if probs_bits else None
    processor = QuantAttnProcessor(QuantSpec("int8", symmetric=symmetric), probs)
    for quantizer in (processor.query_quantizer, processor.key_quantizer, processor.value_quantizer):
        quantizer.calibrate_static(q)
    if probs is not None:
        processor.probs_quantizer.calibrate_static(((q @ q.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
    return processor


class _TokenLayoutAttention(torch.nn.Module):
    """A processor's attention on (batch, tokens, heads x dim) operands, heads split and merged around it."""

    def __init__(self, processor, heads: int) -> None:
        super().__init__()
        self.processor, self.heads = processor, heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = self.processor._attention(
            split(q), split(k), split(v), mask=None, is_causal=False, scale=None, enable_gqa=False
        )
        return out.transpose(1, 2).flatten(2)


def openvino_int8_attention(q: torch.Tensor, symmetric: bool, probs_bits: int | None, threads: int):
    """(call, simulation) of the `openvino` backend's deployed attention on (q, q, q) in token layout."""
    import copy

    import openvino as ov

    from diffquant.runtime.backends.openvino import _attention_for_openvino

    processor = quantized_processor(q, symmetric, probs_bits)
    simulation = _TokenLayoutAttention(processor, q.shape[1])
    deployed = copy.deepcopy(processor)
    _attention_for_openvino(deployed)
    tokens = q.transpose(1, 2).flatten(2)
    with torch.no_grad():
        model = ov.convert_model(_TokenLayoutAttention(deployed, q.shape[1]), example_input=(tokens,) * 3)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    arrays = [tokens.numpy()] * 3
    return (lambda: torch.from_numpy(compiled(arrays)[0])), torch.no_grad()(lambda: simulation(tokens, tokens, tokens))


def int8_scores(heads: torch.Tensor) -> Callable[[], torch.Tensor]:
    """QK^T of (q, q) on int8 codes, one `torch._int_mm` per head."""
    codes = heads.flatten(0, 1).mul(20).round().clamp(-127, 127).to(torch.int8)
    out = torch.empty(codes.shape[0], codes.shape[1], codes.shape[1], dtype=torch.int32)

    def run():
        for index in range(codes.shape[0]):
            torch._int_mm(codes[index], codes[index].t(), out=out[index])
        return out

    return run


def variants(tokens: int, heads: int, dim: int, threads: int) -> dict[str, Callable[[], object]]:
    """Every timed call. Those named `SDPA` or `written out` compute the same attention of (q, q, q)."""
    q = torch.randn(1, heads, tokens, dim, generator=torch.Generator().manual_seed(0))
    qb = q.bfloat16()
    compiled = torch.compile(written_out)
    calls: dict[str, Callable[[], object]] = {
        "torch SDPA fp32": lambda: F.scaled_dot_product_attention(q, q, q),
        "torch SDPA bf16": lambda: F.scaled_dot_product_attention(qb, qb, qb),
        "written out, compiled, bf16": lambda: compiled(qb, qb, qb),
        "QK^T alone, bf16": lambda: qb @ qb.transpose(-1, -2),
        "QK^T alone, int8 (_int_mm per head)": int8_scores(q),
    }
    try:
        for precision in ("f32", "bf16"):
            calls[f"OpenVINO SDPA {precision}"] = openvino_sdpa(q, precision, threads)
        for label, symmetric, probs_bits in INT8_FORMS:
            calls[label] = openvino_int8_attention(q, symmetric, probs_bits, threads)[0]
    except ImportError as error:
        print(f"  OpenVINO rows skipped: {error}; pip install 'diffquant[openvino]'")
    return calls


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call, the variants taking turns (two untimed calls each first: compilation)."""
    with torch.no_grad():
        return interleaved_medians(calls, repeats, warmup=2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--repeats", type=positive, default=7)
    parser.add_argument("--out", default=None, help="JSON file for the results (printed only without it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "note": "milliseconds per attention call at batch 1 (medians of interleaved rounds) and the ratio "
        "against PyTorch's fp32 flash SDPA from the same run",
        "machine": {"host": host_label(), "torch": torch.__version__},
        "threads": args.threads,
        "load_average_1min": os.getloadavg()[0],
        "shapes": {},
    }
    for name in args.shapes:
        tokens, heads, dim = SHAPES[name]
        print(f"\n== {name}: {tokens} tokens, {heads} heads of {dim}", flush=True)
        medians = interleaved(variants(tokens, heads, dim, args.threads), args.repeats)
        base = medians["torch SDPA fp32"]
        width = max(map(len, medians))
        for label, ms in medians.items():
            print(f"  {label:{width}s} {ms:8.1f} ms  {base / ms:5.2f}x torch SDPA fp32", flush=True)
        results["shapes"][name] = {
            "tokens": tokens,
            "heads": heads,
            "head_dim": dim,
            "ms": {k: round(v, 2) for k, v in medians.items()},
            "speed_vs_torch_sdpa_fp32": {k: round(base / v, 3) for k, v in medians.items()},
        }
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
