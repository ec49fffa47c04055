"""W4A4 / W4A8 agreement of svdquant and naive PTQ with fp32 on the shipped models (same seeds).

    PYTHONPATH=src python benchmarks/fourbit_agreement.py [--protocol smoke] [--models fmnist-dit fmnist-unet]

Prints one JSON line per row: PSNR/SSIM vs the fp32 samples of the same seeds, FID of the row and of
fp32 at the protocol's N, calibration seconds. Rows: naive W4A4 (min-max, per-tensor activations),
svdquant W4A4 and W4A8 (fast preset; rank 8 and 32), svdquant NVFP4.
"""

from __future__ import annotations

import argparse
import json
import time

import diffquant
from diffquant.api import record_calibration
from diffquant.evaluation.protocol import Scorer, agreement, cached_samples, get_protocol, protocol_samples
from diffquant.methods import make_config

ROWS = (
    ("naive", None, {"wbits": 4, "abits": 4}),
    ("naive", None, {"wbits": 4, "abits": 8}),
    ("svdquant", "fast", {"wbits": 4, "abits": 4, "rank": 8}),
    ("svdquant", "fast", {"wbits": 4, "abits": 4, "rank": 32}),
    ("svdquant", "fast", {"wbits": 4, "abits": 8, "rank": 8}),
    ("svdquant", "fast", {"wbits": 4, "abits": 4, "rank": 8, "gptq": False}),
    ("svdquant", "fast", {"rank": 8, "weight_format": "nvfp4", "activation_format": "nvfp4",
                          "weight_group_size": 16, "activation_group_size": 16}),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="smoke")
    parser.add_argument("--models", nargs="+", default=["fmnist-dit", "fmnist-unet"])
    parser.add_argument("--rows", nargs="*", type=int, default=None, help="indices into ROWS")
    args = parser.parse_args()
    protocol = get_protocol(args.protocol)
    scorer = Scorer.load(protocol.reference)
    for model_name in args.models:
        model = diffquant.load(model_name)
        reference = cached_samples(model, protocol, progress=False)
        fp32_fid = scorer.score(reference)["fid"]
        for index, (method, preset, options) in enumerate(ROWS):
            if args.rows is not None and index not in args.rows:
                continue
            config = make_config(method, preset, **options)
            calibration = record_calibration(model, config, progress=False)
            started = time.perf_counter()
            quantized = diffquant.quantize(model, config, calibration, progress=False)
            seconds = time.perf_counter() - started
            images = protocol_samples(quantized, protocol, progress=False).images
            row = {
                "model": model_name,
                "method": method,
                "preset": preset,
                "options": options,
                "setting": config.setting,
                "protocol": protocol.name,
                **{k: round(v, 3) for k, v in agreement(images, reference).items()},
                "fid": round(scorer.score(images)["fid"], 2),
                "fp32_fid": round(fp32_fid, 2),
                "calibration_s": round(seconds, 1),
                "branch_bits_per_weight": quantized.quantization["details"].get("branch_bits_per_weight"),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
