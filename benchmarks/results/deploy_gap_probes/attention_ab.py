"""Q-Diffusion / EDA-DM on the openvino backend: their zero-point attention as it ran before
`OpenVINOAttention` (FakeQuantize with zero-points, which OpenVINO runs in float) against the shifted,
zero-point-free form, timed interleaved in one process, one thread, batch 64.

    python benchmarks/results/deploy_gap_probes/attention_ab.py qdiffusion,edadm fmnist-dit fmnist-unet

Loads the quantized models `deploy_gap.py` left in its work directory (runs/deploy-gap) and prints, per
model, the median call time of each form and its relative MSE against the simulation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import diffquant
from diffquant.profiling import interleaved_medians
from diffquant.quant import step_context
from diffquant.runtime.backends import openvino as openvino_backend
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_openvino import OpenVINODenoiser

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from deploy_gap import inputs  # noqa: E402 - the benchmark's own inputs

REPEATS = 15
_shifted = openvino_backend._attention_for_openvino


def _zero_point_form(processor) -> None:
    """The attention as before: FakeQuantize with the grids' zero-points, spelled-out matmuls."""
    _shifted(processor)
    processor.deployed_attention = None


def main() -> None:
    labels, names = sys.argv[1].split(","), sys.argv[2:]
    torch.set_num_threads(1)
    for name in names:
        calls, errors = {}, {}
        x, t, conditioning = inputs(diffquant.load(name), 64)
        for label in labels:
            model = diffquant.load(ROOT / "runs" / "deploy-gap" / name / label)
            for form, prepare in (("zero-point", _zero_point_form), ("shifted", _shifted)):
                openvino_backend._attention_for_openvino = prepare
                runner = next(
                    m for m in export_model(model, "openvino").denoiser.modules() if isinstance(m, OpenVINODenoiser)
                )
                with torch.no_grad(), step_context(0, 500.0, 50):
                    compiled, feed = runner.compiled_call(**model.adapter.call_arguments(runner, x, t, conditioning))
                    simulated = model.denoiser(**model.adapter.call_arguments(model.denoiser, x, t, conditioning))
                simulated = simulated.sample if hasattr(simulated, "sample") else simulated[0]
                request = compiled.create_infer_request()
                out = torch.from_numpy(request.infer(feed)[0].copy())
                errors[(label, form)] = float(((out - simulated) ** 2).mean() / (simulated**2).mean())
                calls[(label, form)] = request.infer  # the inputs stay set on the request
        openvino_backend._attention_for_openvino = _shifted
        medians = interleaved_medians(calls, REPEATS)
        for label in labels:
            before, after = medians[(label, "zero-point")], medians[(label, "shifted")]
            print(
                f"{name} {label}: zero-point {before:.1f} ms, shifted {after:.1f} ms ({before / after:.2f}x); "
                f"relative MSE vs simulation {errors[(label, 'zero-point')]:.2e} / {errors[(label, 'shifted')]:.2e}"
            )


if __name__ == "__main__":
    main()
