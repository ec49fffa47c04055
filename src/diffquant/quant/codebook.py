"""Weight vector quantization (VQ4DiT, Deng et al. 2024): sub-vectors of a weight matrix share a codebook.

A (out, in) weight is cut into d-long sub-vectors along the input dimension; k-means gives a codebook
of K = 2^(bits * d) code vectors, so each weight costs `bits` bits of index plus the codebook. VQ4DiT
keeps the `candidates` nearest codes per sub-vector and learns soft ratios over them (and the
codebook) against the layer's output on calibration inputs, then assigns each sub-vector its
highest-ratio candidate. Stored packed: indices at log2 K bits, the codebook in float16.

With `rank` r > 0 the weight is split LR²VQ-style: W = U D + VQ(W - U D), a 16-bit rank-r branch from
the SVD of W beside a codebook for the residual. The branch can be re-fitted to what the codebook
misses (U D = SVD_r(W - VQ(R))) and the residual quantized again, keeping the best split by output
error on the calibration inputs. The branch is stored in float16 and counted in the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant.lowrank import low_rank_split
from diffquant.quant.packing import pack_codes, unpack_codes


@dataclass(frozen=True)
class CodebookSpec:
    """VQ4DiT-style weight codebooks; defaults give 2 bits per weight (d = 4, K = 256)."""

    vector_dim: int = 4  # d: weights per sub-vector
    bits_per_weight: int = 2  # index bits per weight; K = 2^(bits * d)
    candidates: int = 3  # VQ4DiT's candidate assignments per sub-vector (1 = plain k-means)
    kmeans_iters: int = 20
    refine_steps: int = 200  # Adam steps on candidate ratios + codebook (0 = no calibration)
    refine_lr: float = 1e-2
    seed: int = 0
    rank: int = 0  # LR²VQ: a 16-bit rank-r SVD branch beside the quantized residual (0 = plain VQ)
    branch_refits: int = 2  # with rank > 0: re-fit the branch on W - VQ(R) this many times, keep the best

    @property
    def codebook_size(self) -> int:
        return 2 ** (self.bits_per_weight * self.vector_dim)

    @property
    def index_bits(self) -> int:
        return self.bits_per_weight * self.vector_dim

    def validate(self) -> None:
        if self.vector_dim < 1 or self.bits_per_weight < 1:
            raise ConfigError("vector_dim and bits_per_weight must be >= 1.")
        if self.index_bits > 16:
            raise ConfigError(f"index bits {self.index_bits} > 16: lower bits_per_weight or vector_dim.")
        if self.candidates < 1:
            raise ConfigError(f"candidates must be >= 1, got {self.candidates}.")
        if self.rank < 0 or self.branch_refits < 0:
            raise ConfigError(f"rank and branch_refits must be >= 0, got {self.rank} and {self.branch_refits}.")

    def validate_for(self, shape: tuple[int, ...]) -> None:
        """The spec's checks plus those that need the weight: a rank that fits it."""
        self.validate()
        if len(shape) == 2 and self.rank > min(shape):
            raise ConfigError(
                f"rank {self.rank} exceeds min(out, in) = {min(shape)} of a {tuple(shape)} weight; "
                f"use a rank <= {min(shape)} (or 0 for plain VQ)."
            )


@dataclass
class CodebookWeight:
    """A vector-quantized weight: codebook (K, d), one index per sub-vector, and an optional branch U D."""

    codebook: torch.Tensor
    indices: torch.Tensor  # (out * in / d,) int64
    shape: tuple[int, int]
    up: torch.Tensor | None = None  # (out, r), float16 values
    down: torch.Tensor | None = None  # (r, in), float16 values

    @property
    def rank(self) -> int:
        return 0 if self.up is None else self.up.shape[1]

    def dequantize(self) -> torch.Tensor:
        weight = self.codebook[self.indices].reshape(self.shape)
        return weight + self.up @ self.down if self.rank else weight

    def packed(self) -> dict[str, torch.Tensor]:
        """uint8 packed indices, a float16 codebook and the float16 branch: what goes on disk."""
        bits = int(math.log2(self.codebook.shape[0]))
        tensors = {"indices": pack_codes(self.indices, bits), "codebook": self.codebook.half()}
        if self.rank:
            tensors.update(up=self.up.half(), down=self.down.half())
        return tensors

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> CodebookWeight:
        codebook = tensors["codebook"].float()
        bits = int(math.log2(codebook.shape[0]))
        count = shape[0] * shape[1] // codebook.shape[1]
        up, down = (tensors["up"].float(), tensors["down"].float()) if "up" in tensors else (None, None)
        return cls(codebook, unpack_codes(tensors["indices"], bits, count), tuple(shape), up, down)


def _subvectors(weight: torch.Tensor, d: int) -> torch.Tensor:
    if weight.ndim != 2 or weight.shape[1] % d:
        raise DiffquantError(f"weight {tuple(weight.shape)} cannot be cut into {d}-long sub-vectors along its input.")
    return weight.detach().float().reshape(-1, d)


def _distances(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)[None]


def _weighted_distances(vectors: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Squared distances, each dimension weighted by the layer input's second moment (diagonal Hessian)."""
    if weights is None:
        return _distances(vectors, codebook)
    return (
        (weights * vectors.pow(2)).sum(1, keepdim=True)
        - 2 * (weights * vectors) @ codebook.t()
        + weights @ codebook.pow(2).t()
    )


def kmeans_codebook(
    vectors: torch.Tensor, k: int, iters: int, seed: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(Weighted) k-means with random distinct initial rows; empty clusters take the worst-fit vectors.

    With `weights` (S, d) the centroid is the per-dimension weighted mean: the output-error optimum
    under a diagonal Hessian (as in GPTVQ's data-aware initialisation).
    """
    generator = torch.Generator().manual_seed(seed)
    k = min(k, len(vectors))
    codebook = vectors[torch.randperm(len(vectors), generator=generator)[:k]].clone()
    w = torch.ones_like(vectors) if weights is None else weights
    for _ in range(iters):
        dist = _weighted_distances(vectors, codebook, weights)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(codebook).index_add_(0, assign, w * vectors)
        mass = torch.zeros_like(codebook).index_add_(0, assign, w)
        empty = counts == 0
        codebook = torch.where(empty[:, None], codebook, sums / mass.clamp_min(1e-12))
        if empty.any():
            worst = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            codebook[empty] = vectors[worst]
    return codebook


def quantize_weight(
    weight: torch.Tensor, spec: CodebookSpec = CodebookSpec(), inputs: torch.Tensor | None = None
) -> CodebookWeight:
    """Vector-quantize a (out, in) weight; with calibration `inputs` (N, in), refine VQ4DiT-style.

    With `spec.rank` > 0, a float16 SVD branch takes the weight's top singular directions first.
    """
    spec.validate_for(tuple(weight.shape))
    if spec.rank:
        return _quantize_with_branch(weight.detach().float(), spec, inputs)
    return _quantize_vectors(weight, spec, inputs)


def _quantize_with_branch(weight: torch.Tensor, spec: CodebookSpec, inputs: torch.Tensor | None) -> CodebookWeight:
    """LR²VQ: W = U D + VQ(W - U D); re-fit U D on W - VQ(R) `branch_refits` times, keep the best split."""
    up, down = _half_branch(weight, spec.rank)
    best, best_error = None, math.inf
    for _ in range(1 + spec.branch_refits):
        residual = _quantize_vectors(weight - up @ down, spec, inputs)
        candidate = CodebookWeight(residual.codebook, residual.indices, tuple(weight.shape), up, down)
        error = _reconstruction_error(weight, candidate.dequantize(), inputs)
        if error < best_error:
            best, best_error = candidate, error
        up, down = _half_branch(weight - residual.dequantize(), spec.rank)
    return best


def _half_branch(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r SVD branch rounded to float16 now, so the residual is quantized against what is stored."""
    up, down = low_rank_split(weight, rank)
    return up.half().float(), down.half().float()


def _reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor | None) -> float:
    """Output error on the calibration inputs, or the weight error without them."""
    delta = weight - approx
    if inputs is None:
        return delta.pow(2).mean().item()
    return (inputs.detach().float() @ delta.t()).pow(2).mean().item()


def _quantize_vectors(weight: torch.Tensor, spec: CodebookSpec, inputs: torch.Tensor | None = None) -> CodebookWeight:
    """k-means codebook for the weight's sub-vectors, refined on `inputs` when given (VQ4DiT)."""
    vectors = _subvectors(weight, spec.vector_dim)
    weights = None
    if inputs is not None:  # diagonal of X^T X, tiled to every sub-vector of every output row
        moment = inputs.detach().float().pow(2).mean(0)
        weights = moment.reshape(-1, spec.vector_dim).repeat(weight.shape[0], 1)
    codebook = kmeans_codebook(vectors, spec.codebook_size, spec.kmeans_iters, spec.seed, weights)
    if spec.codebook_size > codebook.shape[0]:  # tiny layers: pad so indices keep their width
        pad = codebook[:1].expand(spec.codebook_size - codebook.shape[0], -1)
        codebook = torch.cat([codebook, pad])
    dist = _weighted_distances(vectors, codebook, weights)
    if inputs is None or spec.refine_steps == 0 or spec.candidates == 1:
        return CodebookWeight(codebook, dist.argmin(1), tuple(weight.shape))
    candidates = dist.topk(spec.candidates, largest=False).indices  # (S, c)
    return _refine(weight.detach().float(), inputs.detach().float(), codebook, candidates, dist, spec)


def _output_error(inputs, target, shape, indices, book) -> torch.Tensor:
    return F.mse_loss(inputs @ book[indices].reshape(shape).t(), target)


def _refine(weight, inputs, codebook, candidates, dist, spec: CodebookSpec) -> CodebookWeight:
    """VQ4DiT: softmax ratios over each sub-vector's candidates and the codebook, trained to match X W^T.

    The ratio temperature is annealed toward one-hot so the final argmax loses little; the codebook
    is then tuned once more for the hard assignment, and the result never does worse than k-means.
    """
    target = inputs @ weight.t()
    scale = target.pow(2).mean().clamp_min(1e-12)
    init = -dist.gather(1, candidates)  # the nearest candidate starts with most of the mass
    logits = (init / init.std().clamp_min(1e-8)).clone().requires_grad_(True)
    book = codebook.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits, book], lr=spec.refine_lr)
    for step in range(spec.refine_steps):
        temperature = 1.0 * (0.02 / 1.0) ** (step / max(1, spec.refine_steps - 1))
        ratios = torch.softmax(logits / temperature, -1)
        soft = (ratios[..., None] * book[candidates]).sum(1).reshape(weight.shape)
        loss = F.mse_loss(inputs @ soft.t(), target) / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    indices = candidates.gather(1, logits.detach().argmax(1, keepdim=True)).squeeze(1)
    book = _tune_codebook(inputs, target, weight.shape, indices, book.detach(), spec)
    plain_indices = dist.argmin(1)
    plain_book = _tune_codebook(inputs, target, weight.shape, plain_indices, codebook, spec)
    with torch.no_grad():
        refined_error = _output_error(inputs, target, weight.shape, indices, book)
        plain_error = _output_error(inputs, target, weight.shape, plain_indices, plain_book)
    if plain_error < refined_error:
        return CodebookWeight(plain_book, plain_indices, tuple(weight.shape))
    return CodebookWeight(book, indices, tuple(weight.shape))


def _tune_codebook(inputs, target, shape, indices, book, spec: CodebookSpec) -> torch.Tensor:
    """Adam on the code vectors alone for a fixed assignment (output-error objective)."""
    book = book.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([book], lr=spec.refine_lr)
    scale = target.pow(2).mean().clamp_min(1e-12)
    for _ in range(max(1, spec.refine_steps // 2)):
        loss = _output_error(inputs, target, shape, indices, book) / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return book.detach()


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
