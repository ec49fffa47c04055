"""Rate-distortion of the token codec over a k-means codebook ladder (K = 2^4 .. 2^12).

Per rung: rate (bpp raw / entropy / coded), distortion (PSNR, SSIM) and the FID of the decoded test
images against the reference set on the shipped feature network (the continuous models' `Scorer`).
The FID of the uncoded test images themselves (`fid_floor`) is the best a rung can score at this N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffquant.evaluation.protocol import Scorer
from diffquant.fileio import write_json
from diffquant.tokens.codec import latent_pool, rate_distortion, rebuild_codebook
from diffquant.tokens.storage import save_token_model
from diffquant.tokens.tokenizer import VQAutoencoder


def codebook_ladder(
    tokenizer: VQAutoencoder,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    sizes: list[int],
    out: str | Path,
    coder: str = "arithmetic",
    pool_size: int = 40000,
    log: Callable[[str], None] = print,
    rungs_dir: str | Path | None = None,
    scorer: Scorer | None = None,
) -> list[dict]:
    """One rebuilt tokenizer per K (saved under rungs_dir or out, as k<K>), scored for rate, distortion
    and FID (on `scorer`, by default the shipped feature network against the Fashion-MNIST test set)."""
    out = Path(out)
    scorer = scorer or Scorer.load()
    fid_floor = scorer.fid(test_images)
    log(f"FID of the uncoded test images (floor at N={len(test_images)}): {fid_floor:.2f}")
    pool = latent_pool(tokenizer, train_images, pool_size)
    rows = [{"rung": "trained", **rate_distortion(tokenizer, test_images, coder, scorer=scorer)}]
    log(str(rows[0]))
    for k in sizes:
        started = time.perf_counter()
        rung = rebuild_codebook(tokenizer, pool, k, iters=10 if k <= 1024 else 6)
        row = {"rung": f"k-means {k}", **rate_distortion(rung, test_images, coder, scorer=scorer)}
        row["rebuild_s"] = time.perf_counter() - started
        save_token_model(rung, Path(rungs_dir or out) / f"k{k}")
        rows.append(row)
        log(str(row))
    summary = {"coder": coder, "num_images": len(test_images), "fid_reference": scorer.reference.name}
    write_json(out / "rd.json", {**summary, "fid_floor": fid_floor, "rows": rows})
    plot_rate_distortion(rows, out / "rd.png", fid_floor)
    return rows


def plot_rate_distortion(rows: list[dict], path: str | Path, fid_floor: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = [r for r in rows if r["rung"] != "trained"]
    metrics = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("fid", "FID vs test set (lower is better)")]
    metrics = [(key, label) for key, label in metrics if all(key in r for r in rows)]  # older tables: no FID
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5))
    trained = [r for r in rows if r["rung"] == "trained"]
    for ax, (metric, ylabel) in zip(axes, metrics, strict=True):
        for key, label, style in (("bpp_raw", "raw indices", "o--"), ("bpp_coded", "arithmetic/lzma coded", "s-")):
            ax.plot([r[key] for r in ladder], [r[metric] for r in ladder], style, label=label)
        for r in trained:
            ax.plot(r["bpp_coded"], r[metric], "k*", markersize=10, label="trained codebook (coded)")
        ax.set_ylabel(ylabel)
    if fid_floor is not None and metrics[-1][0] == "fid":
        axes[-1].axhline(fid_floor, color="grey", linestyle=":", label="uncoded test images")
        axes[-1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("bits per pixel")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fmnist-vq codec: k-means codebook ladder K = 2^4 .. 2^12 (7x7 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
