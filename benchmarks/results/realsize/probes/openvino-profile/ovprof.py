"""Per-node OpenVINO profile of a shipped model's deployed graph (openvino backend)."""
import sys, collections
import torch
import diffquant
import os
if os.environ.get("U8W"): import u8w
if os.environ.get("PROJFQ"): import projfq
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_openvino import OpenVINODenoiser
from diffquant.families import denoise
sys.path.insert(0, "/work/main/benchmarks")
from deploy_gap import inputs

name, label = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = diffquant.load(f"/tmp/dg/work/{name.split('/')[-1]}/{label}")
src = diffquant.load(name)
x, t, kw = inputs(src, 64)
dep = export_model(model, "openvino")
ovd = next(m for m in [dep.denoiser, *dep.denoiser.modules()] if isinstance(m, OpenVINODenoiser))
ovd.properties["PERF_COUNT"] = True
seen = {}
orig = ovd._entry
def entry(args, kwargs):
    seen["a"] = (args, kwargs); return orig(args, kwargs)
ovd._entry = entry
with torch.no_grad():
    denoise(dep.denoiser, x, t, kw)
(compiled, _), tensors = orig(*seen["a"])
req = compiled.create_infer_request()
feed = [t.numpy() for t in tensors]
for _ in range(2): req.infer(feed)
tot = collections.Counter(); n = collections.Counter(); R = 5
for _ in range(R):
    req.infer(feed)
    for p in req.profiling_info:
        if p.status.name != "EXECUTED": continue
        key = (p.node_type, p.exec_type)
        tot[key] += p.real_time.total_seconds() * 1e3 / R; n[key] += 1 / R
all_ = sum(tot.values())
print(f"{name} {label}: total {all_:.1f} ms")
for k, v in tot.most_common(25):
    print(f"  {v:8.2f} ms {100*v/all_:5.1f}%  x{n[k]:.0f}  {k[0]:24s} {k[1]}")
if len(sys.argv) > 3:
    rows = []
    for p in req.profiling_info:
        if p.status.name == "EXECUTED": rows.append((p.real_time.total_seconds()*1e3, p.node_name, p.node_type, p.exec_type))
    for r in sorted(rows, reverse=True)[: int(sys.argv[3])]: print("   %.2f %s | %s | %s" % r)
