"""Per-node OpenVINO profile of a shipped model's deployed graph on the openvino backend.

    OMP_NUM_THREADS=1 python ovprof.py fmnist-dit qdiffusion [TOP]

Loads the quantized model `deploy_gap.py` left in its work directory (`--work /tmp/dg/work`), exports it
to the openvino backend, runs one batch of 64 with PERF_COUNT on, and prints the time per node type (and
the TOP slowest nodes).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

import diffquant
from diffquant.quant import step_context
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_openvino import OpenVINODenoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from deploy_gap import inputs  # noqa: E402 - the benchmark's own inputs

WORK = Path("/tmp/dg/work")
REPEATS = 5


def main() -> None:
    name, label = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.set_num_threads(1)
    model = diffquant.load(WORK / name.split("/")[-1] / label)
    x, t, conditioning = inputs(diffquant.load(name), 64)
    deployed = export_model(model, "openvino")
    runner = next(m for m in deployed.denoiser.modules() if isinstance(m, OpenVINODenoiser))
    runner.properties["PERF_COUNT"] = True
    with torch.no_grad(), step_context(0, 500.0, 50):
        compiled, feed = runner.compiled_call(**model.adapter.call_arguments(runner, x, t, conditioning))
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer(feed)
    total, count = collections.Counter(), collections.Counter()
    for _ in range(REPEATS):
        request.infer(feed)
        for node in request.profiling_info:
            if node.status.name == "EXECUTED":
                key = (node.node_type, node.exec_type)
                total[key] += node.real_time.total_seconds() * 1e3 / REPEATS
                count[key] += 1 / REPEATS
    overall = sum(total.values())
    print(f"{name} {label}: total {overall:.1f} ms")
    for key, ms in total.most_common(25):
        print(f"  {ms:8.2f} ms {100 * ms / overall:5.1f}%  x{count[key]:.0f}  {key[0]:24s} {key[1]}")
    nodes = [
        (node.real_time.total_seconds() * 1e3, node.node_name, node.node_type, node.exec_type)
        for node in request.profiling_info
        if node.status.name == "EXECUTED"
    ]
    for ms, node_name, node_type, exec_type in sorted(nodes, reverse=True)[:top]:
        print(f"   {ms:.2f} {node_name} | {node_type} | {exec_type}")


if __name__ == "__main__":
    main()
