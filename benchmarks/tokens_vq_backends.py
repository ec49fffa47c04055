"""Own EMA VQ vs vector-quantize-pytorch 1.32.0 on the same data stream: time per step, usage, perplexity."""
import sys, time, torch
sys.path.append("/tmp/vqp_site")
torch.set_num_threads(1)
from vector_quantize_pytorch import VectorQuantize, SimVQ as LSimVQ
from diffquant.tokens.quantizers import VectorQuantizer, VQConfig, SimVQ, usage_stats

torch.manual_seed(0)
centers = torch.randn(400, 32)
def batch(g):
    idx = torch.randint(0, 400, (6272,), generator=g)
    return centers[idx] + 0.3 * torch.randn(6272, 32, generator=g)
test = batch(torch.Generator().manual_seed(99))
def run(name, make, call, steps=150):
    g = torch.Generator().manual_seed(0); q = make(); q.train()
    t = time.perf_counter()
    for _ in range(steps):
        x = batch(g).requires_grad_(True)
        out, idx, loss = call(q, x)
        (out.sum() + loss.sum()).backward()
    ms = 1000 * (time.perf_counter() - t) / steps
    q.eval()
    with torch.no_grad():
        _, idx, _ = call(q, test)
    s = usage_stats(idx.reshape(-1), 256)
    mse = ((q_embed(q, idx) - test) ** 2).mean().item() if False else float('nan')
    print(f"{name:45s} {ms:7.1f} ms/step  usage {s['usage']:.3f}  perplexity {s['perplexity']:.1f}")
def ours(q, x):
    o = q(x); return o.quantized, o.indices, o.loss
def theirs(q, x):
    return q(x[None])[0][0], q(x[None])[1][0], q(x[None])[2] if False else torch.zeros(()) 
def theirs(q, x):
    out, idx, loss = q(x[None]); return out[0], idx[0], loss
run("diffquant VectorQuantizer (EMA .99, kmeans, restart)", lambda: VectorQuantizer(VQConfig(256, 32)), ours)
run("diffquant SimVQ", lambda: SimVQ(), ours)
run("lucidrains VectorQuantize defaults", lambda: VectorQuantize(dim=32, codebook_size=256), theirs)
run("lucidrains VectorQuantize decay .99 kmeans dead-code 1", lambda: VectorQuantize(dim=32, codebook_size=256, decay=0.99, kmeans_init=True, threshold_ema_dead_code=1, rotation_trick=False), theirs)
run("lucidrains SimVQ defaults", lambda: LSimVQ(dim=32, codebook_size=256), theirs)
