"""Per-node OpenVINO profile of ours (openvino backend) against NNCF's graph, on a real-width PixArt-alpha
with few blocks, batch 1, one thread, bf16 hint.

    python pixprof.py 2 naive
    python pixprof.py 2 naive:attention_bits=8,attention_symmetric=true
    SYMFQ=1 python pixprof.py 2 naive:attention_bits=8   # with symfq.py's patch (prices symmetric grids)
    python pixprof.py 4 naive:attention_bits=8,softmax_bits=8 2   # 4 blocks, 2 threads

Prints the two graphs' interleaved wall-clock medians, then for each graph the time per node type and the
slowest nodes (block numbers folded together).
"""

from __future__ import annotations

import collections
import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path

import nncf
import openvino as ov
import torch
from diffusers import PixArtTransformer2DModel

import diffquant
from diffquant.cli import parse_options
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_openvino import OpenVINODenoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
import realsize_speed as suite  # noqa: E402 - the suite's own wrappers and calibration set

if os.environ.get("SYMFQ"):
    sys.path.insert(0, str(Path(__file__).parent))
    import symfq  # noqa: E402, F401 - patches OpenVINOFakeQuantize on import

THREADS, REPEATS, CALIBRATION = 1, 3, 8


def build(layers: int) -> suite.Case:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=1152,
        caption_channels=4096,
        sample_size=64,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    denoiser = suite.KeywordDenoiser(model, "hidden_states", extra)
    return suite.Case("pixart", denoiser, (4, 64, 64), {"encoder_hidden_states": (120, 4096)}, "probe")


def profile(request, feed) -> tuple[collections.Counter, collections.Counter]:
    for _ in range(2):
        request.infer(feed)
    total, count = collections.Counter(), collections.Counter()
    for _ in range(REPEATS):
        request.infer(feed)
        for node in request.profiling_info:
            if node.status.name != "EXECUTED":
                continue
            name = re.sub(r"_\d+", "", re.sub(r"blocks\.\d+", "blocks.N", node.node_name))
            key = (name[-80:], node.node_type, node.exec_type)
            total[key] += node.real_time.total_seconds() * 1e3 / REPEATS
            count[key] += 1 / REPEATS
    return total, count


def show(title: str, total: collections.Counter, count: collections.Counter) -> None:
    print(f"== {title}: {sum(total.values()):.1f} ms")
    by_type = collections.Counter()
    for key, ms in total.items():
        by_type[(key[1], key[2])] += ms
    for key, ms in by_type.most_common(12):
        print(f"   {ms:8.1f} ms  {key[0]} {key[1]}")
    for key, ms in total.most_common(30):
        print(f"   {ms:8.2f} x{count[key]:<3.0f} {key[0]} | {key[1]} {key[2]}")


def nncf_graph(case: suite.Case, sample, timestep, conditioning, properties):
    names = list(conditioning)
    wrapper = suite._FloatTimestep(copy.deepcopy(case.denoiser), names)
    batches = suite._calibration(case, CALIBRATION).batches(1)
    items = [(b.sample, b.timesteps, *[b.conditioning[k] for k in names]) for b in batches]
    quantized = nncf.quantize(wrapper, nncf.Dataset(items), subset_size=len(items))
    converted = ov.convert_model(quantized, example_input=(sample, timestep, *conditioning.values()))
    compiled = ov.Core().compile_model(converted, "CPU", properties)
    return compiled, [sample.numpy(), timestep.numpy(), *[v.numpy() for v in conditioning.values()]]


def our_graph(case: suite.Case, method: str, threads: int, sample, timestep, conditioning):
    name, _, options = method.partition(":")
    config = diffquant.methods.make_config(
        name, wbits=8, abits=8, **parse_options(options.split(",") if options else [])
    )
    model = suite._diffquant_model(case, False)
    quantized = diffquant.quantize(model, config, suite._calibration(case, CALIBRATION), progress=False)
    deployed = export_model(quantized, "openvino", compute_dtype="bfloat16")
    runner = next(m for m in deployed.denoiser.modules() if isinstance(m, OpenVINODenoiser))
    runner.properties["PERF_COUNT"] = True
    runner.threads = threads
    with torch.no_grad():
        return runner.compiled_call(**model.adapter.call_arguments(runner, sample, timestep, conditioning))


def wall_clock(requests: dict, rounds: int = 7) -> None:
    """Median wall time per call of each graph, the graphs taking turns."""
    times: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(rounds):
        for name, (request, feed) in requests.items():
            start = time.perf_counter()
            request.infer(feed)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print("wall " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items()), end="")
    print(f": NNCF / ours {medians['NNCF'] / medians['ours']:.3f}")


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    method = sys.argv[2] if len(sys.argv) > 2 else "naive"
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else THREADS
    torch.set_num_threads(threads)
    case = build(layers)
    sample, timestep, conditioning = case.inputs(1)
    properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True}
    requests = {}
    for name, graph in (
        ("NNCF", nncf_graph(case, sample, timestep, conditioning, properties)),
        ("ours", our_graph(case, method, threads, sample, timestep, conditioning)),
    ):
        compiled, feed = graph
        requests[name] = (compiled.create_infer_request(), feed)
        for _ in range(2):  # warm up outside the timed rounds
            requests[name][0].infer(feed)
    wall_clock(requests)
    show("NNCF", *profile(*requests["NNCF"]))
    show("ours " + method, *profile(*requests["ours"]))


if __name__ == "__main__":
    main()
