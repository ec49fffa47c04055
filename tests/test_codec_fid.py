"""FID per rate in the codec's codebook ladder: computed on the decoded images, against the reference."""

from __future__ import annotations

import json
import math

import torch

from diffquant.evaluation.feature_net import extract_features, load_feature_network
from diffquant.evaluation.metrics import GaussianStats
from diffquant.evaluation.protocol import Scorer
from diffquant.evaluation.reference import ReferenceStats
from diffquant.tokens.codec import rate_distortion
from diffquant.tokens.ladder import codebook_ladder
from diffquant.tokens.tokenizer import TokenizerConfig, VQAutoencoder


def _images(count: int = 128) -> torch.Tensor:
    """Bars at class-dependent rows with random brightness and width: a varied, structured toy set."""
    generator = torch.Generator().manual_seed(0)
    images = -torch.ones(count, 1, 28, 28)
    for index in range(count):
        row, width = 2 * (index % 10) + 4, int(torch.randint(8, 22, (1,), generator=generator))
        images[index, 0, row : row + 2, 4 : 4 + width] = torch.rand(1, generator=generator).item() * 1.5 - 0.5
    return images


def _scorer(reference: torch.Tensor) -> Scorer:
    """The shipped feature network against statistics of `reference` (the test set takes a minute to build)."""
    network = load_feature_network()
    features = extract_features(network, reference)
    stats = ReferenceStats(
        "toy", features.spatial, GaussianStats.of(features.pooled), GaussianStats.of(features.spatial)
    )
    return Scorer(network, stats)


class _LookupCodec:
    """A codec whose token is the index of the image in a bank; decoding returns `shown[index]`."""

    def __init__(self, bank: torch.Tensor, shown: torch.Tensor):
        self.bank, self.shown, self.codebook_size = bank, shown, len(bank)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        match = (images.flatten(1)[:, None] == self.bank.flatten(1)[None]).all(-1)
        return match.float().argmax(1).reshape(-1, 1, 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shown[tokens[:, 0, 0]]


def test_codec_fid_scores_the_decoded_images():
    images = _images()
    scorer = _scorer(images)
    shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))]
    identity = rate_distortion(_LookupCodec(images, images), images, scorer=scorer)
    permuted = rate_distortion(_LookupCodec(images, shuffled), images, scorer=scorer)  # same set, wrong pairs
    destroyed = rate_distortion(_LookupCodec(images, torch.zeros_like(images)), images, scorer=scorer)
    assert identity["fid"] < 1e-3 * destroyed["fid"] and destroyed["fid"] > 10
    # FID is a set statistic (pairing does not matter), PSNR is not: both see the decoded images
    assert math.isclose(permuted["fid"], identity["fid"], abs_tol=1e-3)
    assert permuted["psnr"] < identity["psnr"] - 10
    assert "fid" not in rate_distortion(_LookupCodec(images, images), images)  # no scorer, no FID


def test_ladder_reports_finite_fid_per_rung_and_the_floor(tmp_path):
    torch.manual_seed(0)
    tokenizer = VQAutoencoder(TokenizerConfig(quantizer="vq", codebook_size=16, latent_dim=8, width=4)).eval()
    test_images = _images(64)
    train = torch.rand(32, 1, 28, 28) * 2 - 1
    rows = codebook_ladder(
        tokenizer, train, test_images, [4, 8], tmp_path, pool_size=500, scorer=_scorer(test_images), log=lambda _: None
    )
    table = json.loads((tmp_path / "rd.json").read_text())
    assert [r["rung"] for r in table["rows"]] == ["trained", "k-means 4", "k-means 8"] == [r["rung"] for r in rows]
    assert table["fid_floor"] < 1e-3  # the uncoded test images against their own statistics
    assert all(math.isfinite(r["fid"]) and r["fid"] > 100 * max(table["fid_floor"], 1e-3) for r in table["rows"])
    assert (tmp_path / "rd.png").stat().st_size > 0
