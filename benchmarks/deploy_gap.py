"""Deployed W8A8 of every method against PT2E's int8 on the same model, timed side by side.

    OMP_NUM_THREADS=1 python benchmarks/deploy_gap.py --models fmnist-dit fmnist-unet --out gap.json

One process, one thread: fp32 compiled (inductor freezing), PT2E int8 (X86InductorQuantizer, compiled)
and each method's model exported to the onednn backend (and with `--backends`, the inductor or openvino
backend) and compiled, timed interleaved (every variant
once per round, `--repeats` rounds, median) on one batch of `--batch` denoiser inputs. TFMQ runs twice:
with per-step activation banks (its default) and with one shared set, to price the per-step indexing.
Calibration is deliberately cheap (a few trajectories, a few reconstruction iterations): the kernels
and the graph - hence the speed - do not depend on how well the scales were calibrated.

Every deployed model is also checked against its simulation (max |deployed - simulated| / max |simulated|
over a few timesteps). `--before` adds, for every model the changes this script was written for touch,
its deployed graph as it was before them - the GELU after a corrected GEMM (affine 8-bit weights:
Q-Diffusion, EDA-DM) in inductor's tanh form, float32 hand-offs to per-step input grids (TFMQ) - so
before/after ratios come from one run. Ratios, not absolute times,
are what compare across machines and loads.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

import diffquant
from diffquant.bench.peers import PT2E
from diffquant.errors import DiffquantError
from diffquant.families import denoise
from diffquant.fileio import write_json
from diffquant.methods.qdiffusion import DEPLOY_CHOICES
from diffquant.profiling import interleaved_medians
from diffquant.quant import step_context
from diffquant.runtime.deploy import agreement_with_simulation
from diffquant.runtime.export import DeployedDenoiser, export_model
from diffquant.runtime.kernels import OneDNNInt8Linear, SigmoidFormGELU

METHODS = ("naive", "ptq4dm", "qdiffusion", "tfmq", "edadm")
# asymmetric 8-bit weights do not fit int8: their GEMMs need a zero-point correction pass (runtime/kernels.py)
AFFINE_WEIGHT_METHODS = {"qdiffusion", "edadm"}


class _TanhGELU(nn.Module):
    """The GELU after a corrected int8 GEMM as it ran before: torch's tanh form, compiled by inductor."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate="tanh")


def as_before(deployed) -> int:
    """Turn an exported (uncompiled) model's graph back into the one before this change, in place;
    returns how many modules changed (0: the change did not touch this model)."""
    inner, changed = deployed.denoiser.inner, 0
    for name, module in list(inner.named_modules()):
        if isinstance(module, SigmoidFormGELU):
            parent_name, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent_name) if parent_name else inner, child, _TanhGELU(module.proj))
            changed += 1
    for producer, consumer in chained_pairs(inner):  # per-step grids took float32 outputs before
        if producer.output_grid.per_step:
            object.__setattr__(producer, "output_grid", None)
            consumer.takes_codes = False
            changed += 1
    return changed


def chained_pairs(inner: nn.Module) -> list[tuple[OneDNNInt8Linear, OneDNNInt8Linear]]:
    """(producer, consumer) of every int8 GEMM that writes the next one's uint8 codes."""
    linears = [m for m in inner.modules() if isinstance(m, OneDNNInt8Linear)]
    by_grid = {id(m.input): m for m in linears}
    return [(m, by_grid[id(m.output_grid)]) for m in linears if m.output_grid is not None]


CHEAP_RECONSTRUCTION = {"weight_iters": 2, "act_iters": 2, "batch_size": 8}


def method_options(method: str) -> dict:
    """Options that keep calibration to seconds while building the method's full quantized graph."""
    options = {"wbits": 8, "abits": 8}
    if method in ("qdiffusion", "tfmq", "edadm"):
        options["reconstruction"] = dict(CHEAP_RECONSTRUCTION)
    if method == "tfmq":
        options["weight_steps"] = 2
    return options


def quantized(source, method: str, calibration, work: Path, label: str, **extra):
    """The method's W8A8 model, calibrated once and kept under `work` (reruns load it)."""
    path = work / label
    if (path / "diffquant.json").is_file():
        return diffquant.load(path)
    config = diffquant.methods.make_config(method, **method_options(method), **extra)
    model = diffquant.quantize(source, config, calibration=calibration, progress=False)
    diffquant.save(model, path, overwrite=True)
    return model


def inputs(model, batch: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *model.info.image_shape), generator=generator)
    t = torch.full((batch,), 500)
    kwargs = {"class_labels": torch.arange(batch) % model.info.num_classes} if model.info.conditional else {}
    return x, t, kwargs


def bench_model(name: str, args) -> dict:
    print(f"\n== {name}", flush=True)
    started = time.perf_counter()
    source = diffquant.load(name)
    work = Path(args.work) / Path(name).name
    calibration_config = diffquant.methods.make_config(
        "naive", calibration={"trajectories": args.trajectories, "policy": "uniform", "uniform_steps": 5, "steps": 10}
    )
    calibration = diffquant.record_calibration(source, calibration_config, progress=False)
    models = {method: quantized(source, method, calibration, work, method) for method in args.methods}
    if "tfmq" in args.methods:
        models["tfmq shared set"] = quantized(
            source, "tfmq", calibration, work, "tfmq-shared", activation_per_step=False
        )
    if args.symmetric:  # the affine-weight methods with symmetric weights: prices the zero-point correction
        for method in AFFINE_WEIGHT_METHODS & set(args.methods):
            models[f"{method} symmetric weights"] = quantized(
                source, method, calibration, work, f"{method}-symmetric", weight_symmetric=True
            )
            models[f"{method} symmetric, float attention"] = quantized(  # its `deploy` preset's choices
                source, method, calibration, work, f"{method}-symmetric-float-attention", **DEPLOY_CHOICES
            )
    print(f"  calibrated in {time.perf_counter() - started:.0f} s", flush=True)

    x, t, kwargs = inputs(source, args.batch)
    batches = [(x, t, kwargs)]
    variants, agreement, kernels = {}, {}, {}

    inductor_config.freezing = True  # fp32's strongest path: constant-folded, prepacked weights
    try:
        variants["fp32 compiled"] = torch.compile(copy.deepcopy(source.denoiser))
    finally:
        inductor_config.freezing = False
    variants["pt2e int8"] = PT2E().quantize(source.denoiser, "W8A8", batches).denoiser
    for label, model in models.items():
        for backend in args.backends:
            named = label if backend == "onednn" else f"{label} [{backend}]"
            try:
                deployed = export_model(model, backend, compile=True)
            except DiffquantError as error:  # a backend refusing a model: one line, the rest still timed
                print(f"  {named}: not exported: {error}", flush=True)
                continue
            variants[named] = deployed.denoiser
            kernels[named] = deployed.quantization["kernels"]
            # the inductor backend's kernels exist only compiled (uncompiled it is a float emulation); openvino
            # compiles its own graph either way
            checked = deployed if backend in ("inductor", "openvino") else export_model(model, backend)
            agreement[named] = agreement_with_simulation(model, checked)
            if args.bf16:  # the same export with everything around the int8 kernels in bfloat16
                try:
                    bf16 = export_model(model, backend, compile=True, compute_dtype="bfloat16")
                except DiffquantError as error:
                    print(f"  {named} (bf16 compute): not exported: {error}", flush=True)
                    continue
                variants[f"{named} (bf16 compute)"] = bf16.denoiser
        if args.before:
            before = export_model(model, "onednn")
            if as_before(before):
                variants[f"{label} (before)"] = DeployedDenoiser(before.denoiser.inner, before.denoiser.clock, True)

    def call(module):
        def run():
            with torch.no_grad(), step_context(0, 500.0, 50):
                return denoise(module, x, t, kwargs)

        return run

    calls = {label: call(module) for label, module in variants.items()}
    with inductor_config.patch(freezing=False):
        for label, run in calls.items():  # warm-up: compilation happens here
            begun = time.perf_counter()
            run()
            run()
            print(f"  warm {label}: {time.perf_counter() - begun:.0f} s", flush=True)
    medians = interleaved_medians(calls, args.repeats)
    base, peer = medians["fp32 compiled"], medians["pt2e int8"]
    print(f"  {'variant':28s} {'vs fp32 compiled':>17s} {'vs pt2e':>8s}  max rel. error vs simulation")
    for label, value in medians.items():
        error = agreement.get(label, {}).get("max_relative_error")
        shown = "" if error is None else f"{error:.2e}"
        print(f"  {label:28s} {base / value:16.2f}x {peer / value:7.2f}x  {shown}", flush=True)
    result = {
        "batch": args.batch,
        "repeats": args.repeats,
        "speedup_vs_fp32_compiled": {k: round(base / v, 3) for k, v in medians.items()},
        "speed_vs_pt2e": {k: round(peer / v, 3) for k, v in medians.items()},
        "agreement_with_simulation": agreement,
        "kernels": kernels,
    }
    if "tfmq" in medians and "tfmq shared set" in medians:
        result["per_step_vs_shared"] = round(medians["tfmq shared set"] / medians["tfmq"], 3)
        print(f"  per-step banks run at {result['per_step_vs_shared']:.3f} of the shared set's speed", flush=True)
    for backend in (b for b in args.backends if b != "onednn"):  # onednn's pair is the unsuffixed one above
        per_step, shared = f"tfmq [{backend}]", f"tfmq shared set [{backend}]"
        if per_step in medians and shared in medians:
            ratio = round(medians[shared] / medians[per_step], 3)
            result[f"per_step_vs_shared [{backend}]"] = ratio
            print(f"  per-step banks on {backend} run at {ratio:.3f} of the shared set's speed", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist-dit", "fmnist-unet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--before", action="store_true", help="also time the deployed graphs before this change")
    parser.add_argument(
        "--symmetric",
        action="store_true",
        help="also time qdiffusion/edadm with symmetric weights (and float attention)",
    )
    parser.add_argument("--bf16", action="store_true", help="also time each export with compute_dtype='bfloat16'")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["onednn"],
        choices=["onednn", "inductor", "openvino"],
        help="export every method to each (onednn: our operators; inductor: lowered by inductor as for PT2E; "
        "openvino: the whole graph on OpenVINO's runtime)",
    )
    parser.add_argument("--work", default="runs/deploy-gap")
    parser.add_argument("--out", default=None, help="JSON file for the results (printed only without it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # a dozen models compiled in one process share the diffusers forward's code object: without room
    # for one graph each, the last ones would fall back to eager
    torch._dynamo.config.recompile_limit = 64
    load_before = os.getloadavg()
    results = {
        "note": "ratios of medians timed interleaved in one process at 1 thread; absolute times are not reported "
        "(they move with the machine's load, the ratios much less)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "models": {name: bench_model(name, args) for name in args.models},
    }
    # other work on the machine shows here: a 1-minute load near 1 means this process ran alone
    results["load_average_1min"] = {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}
    if args.out:
        write_json(args.out, results)  # atomic: a killed run leaves the previous results whole
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
