"""Per-node OpenVINO profile: ours (openvino backend) vs NNCF, on a 4-block real-width PixArt, batch 1."""
import sys, collections, re, copy
import torch
sys.path.insert(0, "/work/main/benchmarks")
import realsize_speed as rs
import diffquant
from diffquant.runtime.export import export_model
from diffquant.runtime.kernels_openvino import OpenVINODenoiser
from diffquant.families import denoise
import openvino as ov, nncf, os
if os.environ.get("SYMFQ"): import symfq
from diffusers import PixArtTransformer2DModel

LAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
METHOD = sys.argv[2] if len(sys.argv) > 2 else "naive"
THREADS = 1
torch.set_num_threads(THREADS); torch.manual_seed(0)
model = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
    num_layers=LAYERS, cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2,
    norm_type="ada_norm_single", use_additional_conditions=False).eval()
case = rs.Case("pixart", rs.KeywordDenoiser(model, "hidden_states", {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}),
               (4, 64, 64), {"encoder_hidden_states": (120, 4096)}, "probe")
class A: calibration = 8; threads = THREADS; tiny = False; compile = False
sample, t, cond = case.inputs(1)

def profile(req, feed, R=3):
    for _ in range(2): req.infer(feed)
    tot = collections.Counter(); n = collections.Counter()
    for _ in range(R):
        req.infer(feed)
        for p in req.profiling_info:
            if p.status.name != "EXECUTED": continue
            key = re.sub(r"_\d+", "", re.sub(r"blocks\.\d+", "blocks.N", p.node_name))
            key = (key[-80:], p.node_type, p.exec_type)
            tot[key] += p.real_time.total_seconds() * 1e3 / R; n[key] += 1 / R
    return tot, n

def show(title, tot, n):
    all_ = sum(tot.values())
    print(f"== {title}: {all_:.1f} ms")
    types = collections.Counter()
    for k, v in tot.items(): types[(k[1], k[2])] += v
    for k, v in types.most_common(12): print(f"   {v:8.1f} ms  {k[0]} {k[1]}")
    for k, v in tot.most_common(30): print(f"   {v:8.2f} x{n[k]:<3.0f} {k[0]} | {k[1]} {k[2]}")

props = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True}
# NNCF
names = list(cond)
wrapper = rs._FloatTimestep(copy.deepcopy(case.denoiser), names)
cal = rs._calibration(case, A.calibration)
items = [(b.sample, b.timesteps, *[b.conditioning[k] for k in names]) for b in cal.batches(1)]
q = nncf.quantize(wrapper, nncf.Dataset(items), subset_size=len(items))
ovm = ov.convert_model(q, example_input=(sample, t, *cond.values()))
c = ov.Core().compile_model(ovm, "CPU", props)
nn_tot, nn_n = profile(c.create_infer_request(), [sample.numpy(), t.numpy(), *[v.numpy() for v in cond.values()]])
del c, ovm, q
# ours
dm = rs._diffquant_model(case, False)
name, _, options = METHOD.partition(":")
from diffquant.cli import parse_options
config = diffquant.methods.make_config(name, wbits=8, abits=8, **parse_options(options.split(",") if options else []))
quant = diffquant.quantize(dm, config, rs._calibration(case, A.calibration), progress=False)
dep = export_model(quant, "openvino", compute_dtype="bfloat16")
ovd = next(m for m in [dep.denoiser, *dep.denoiser.modules()] if isinstance(m, OpenVINODenoiser))
ovd.properties["PERF_COUNT"] = True; ovd.threads = THREADS
seen = {}
orig = ovd._entry
ovd._entry = lambda a, k: (seen.setdefault("a", (a, k)), orig(a, k))[1]
with torch.no_grad(): denoise(dep.denoiser, sample, t, cond)
(comp, _), tensors = orig(*seen["a"])
our_tot, our_n = profile(comp.create_infer_request(), [x.numpy() for x in tensors])
show("NNCF", nn_tot, nn_n); show("ours " + METHOD, our_tot, our_n)
