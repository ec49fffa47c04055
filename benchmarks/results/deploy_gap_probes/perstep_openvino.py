"""TFMQ-DM's per-step grids against one shared set on the openvino backend, at three steps of a 50-step
run, timed interleaved (one thread, batch 64): `deploy_gap.py` times one step with 7 repeats, where two
graphs of the same structure moved +-5 % between runs.

    python benchmarks/results/deploy_gap_probes/perstep_openvino.py fmnist-dit 21

Loads the `tfmq` and `tfmq-shared` models `deploy_gap.py` left in runs/deploy-gap.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import diffquant
from diffquant.families import denoise
from diffquant.profiling import interleaved_medians
from diffquant.quant import step_context
from diffquant.runtime.export import export_model

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from deploy_gap import inputs  # noqa: E402 - the benchmark's own inputs

STEPS = ((0, 980.0), (25, 500.0), (49, 20.0))


def main() -> None:
    name = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 21
    torch.set_num_threads(1)
    x, t, conditioning = inputs(diffquant.load(name), 64)
    calls = {}
    for label in ("tfmq", "tfmq-shared"):
        deployed = export_model(diffquant.load(ROOT / "runs" / "deploy-gap" / name / label), "openvino").denoiser
        for index, timestep in STEPS:

            def run(module=deployed, index=index, timestep=timestep):
                with torch.no_grad(), step_context(index, timestep, 50):
                    return denoise(module, x, t, conditioning)

            run()  # compiles this step's graph
            calls[(label, timestep)] = run
    medians = interleaved_medians(calls, repeats)
    for _, timestep in STEPS:
        per_step, shared = medians[("tfmq", timestep)], medians[("tfmq-shared", timestep)]
        print(
            f"{name} t={timestep:.0f}: per-step {per_step:.1f} ms, shared {shared:.1f} ms, {shared / per_step:.3f}"
        )
    per_step = sum(medians[("tfmq", timestep)] for _, timestep in STEPS)
    shared = sum(medians[("tfmq-shared", timestep)] for _, timestep in STEPS)
    print(f"{name}: per-step grids run at {shared / per_step:.3f} of the shared set's speed over the three steps")


if __name__ == "__main__":
    main()
