"""Truncated SVD splits shared by the low-rank layer kind (SVDQuant) and low-rank + VQ codebooks (LR²VQ)."""

from __future__ import annotations

import torch


def low_rank_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in...)) with up @ down the best rank-r approximation of the flattened weight."""
    flat = weight.reshape(weight.shape[0], -1).double()
    u, singular, vh = torch.linalg.svd(flat, full_matrices=False)
    up = (u[:, :rank] * singular[:rank]).float()
    down = vh[:rank].float().reshape(rank, *weight.shape[1:])
    # contiguous, as a reloaded file holds them: LAPACK's factors come transposed, and a GEMM on another
    # layout may round differently (AMD EPYC's does), so a saved model would not reload bit-identically
    return up.contiguous(), down.contiguous()
