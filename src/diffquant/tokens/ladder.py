"""Rate-distortion of the token codec over a k-means codebook ladder (K = 2^4 .. 2^12)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

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
) -> list[dict]:
    """One rebuilt tokenizer per K (saved under rungs_dir or out, as k<K>), scored for rate and distortion."""
    out = Path(out)
    pool = latent_pool(tokenizer, train_images, pool_size)
    rows = [{"rung": "trained", **rate_distortion(tokenizer, test_images, coder)}]
    log(str(rows[0]))
    for k in sizes:
        started = time.perf_counter()
        rung = rebuild_codebook(tokenizer, pool, k, iters=10 if k <= 1024 else 6)
        row = {"rung": f"k-means {k}", **rate_distortion(rung, test_images, coder)}
        row["rebuild_s"] = time.perf_counter() - started
        save_token_model(rung, Path(rungs_dir or out) / f"k{k}")
        rows.append(row)
        log(str(row))
    write_json(out / "rd.json", {"coder": coder, "num_images": len(test_images), "rows": rows})
    plot_rate_distortion(rows, out / "rd.png")
    return rows


def plot_rate_distortion(rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = [r for r in rows if r["rung"] != "trained"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label, style in (("bpp_raw", "raw indices", "o--"), ("bpp_coded", "arithmetic/lzma coded", "s-")):
        axes[0].plot([r[key] for r in ladder], [r["psnr"] for r in ladder], style, label=label)
        axes[1].plot([r[key] for r in ladder], [r["ssim"] for r in ladder], style, label=label)
    trained = [r for r in rows if r["rung"] == "trained"]
    for r in trained:
        axes[0].plot(r["bpp_coded"], r["psnr"], "k*", markersize=10, label="trained codebook (coded)")
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].set_ylabel("SSIM")
    for ax in axes:
        ax.set_xlabel("bits per pixel")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fmnist-vq codec: k-means codebook ladder K = 2^4 .. 2^12 (7x7 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
