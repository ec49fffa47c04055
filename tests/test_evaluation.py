"""The evaluation protocol on the shipped feature network and the shipped reference models."""

import json

import pytest
import torch

from diffquant.data import load_fashion_mnist
from diffquant.evaluation import EvalProtocol, Scorer, evaluate, get_protocol
from diffquant.evaluation.feature_net import CARD_FILE, accuracy, load_feature_network
from diffquant.sampling import SamplerConfig, sample
from diffquant.zoo import REFERENCE_MODELS, load_model
from diffquant.zoo.registry import WEIGHTS_DIR
from tests.conftest import needs_fmnist


@pytest.fixture(scope="module")
def scorer():
    return Scorer.load("fashion-mnist-test")


@needs_fmnist
def test_feature_network_accuracy():
    card = json.loads(CARD_FILE.read_text())
    assert card["test_accuracy"] >= 0.90
    assert accuracy(load_feature_network(), load_fashion_mnist("test").subset(2000, seed=3)) >= 0.90


@needs_fmnist
def test_real_images_score_near_zero_and_noise_scores_high(scorer):
    real = load_fashion_mnist("test").subset(1000, seed=5)
    real_scores = scorer.score(real.images, real.labels)
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_scores = scorer.score(noise)
    assert real_scores["fid"] < 5.0 and noise_scores["fid"] > 200.0
    assert real_scores["class_accuracy"] > 0.9
    assert real_scores["precision"] > 0.7 and noise_scores["precision"] < 0.25 and noise_scores["recall"] < 0.05
    assert real_scores["is"] > noise_scores["is"]


def test_protocols_and_validation():
    assert get_protocol("standard").num_samples == 5000
    assert "N=5000" in get_protocol("standard").describe()
    with pytest.raises(Exception, match="at least 10"):
        EvalProtocol(num_samples=2).validate()
    with pytest.raises(Exception, match="Unknown protocol"):
        get_protocol("huge")


@needs_fmnist
@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_shipped_models_have_cards_grids_and_metrics(name):
    folder = WEIGHTS_DIR / name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["protocol"]["num_samples"] >= 5000
    assert (folder / "samples.png").stat().st_size > 0 and "## Evaluation" in (folder / "README.md").read_text()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 25e6
    # recognisable items (floor 0.5); the DiT got 5,000 CPU steps and is the weaker of the two
    assert metrics["metrics"]["fid"] < {"fmnist-unet": 40.0, "fmnist-dit": 80.0}[name]


@needs_fmnist
def test_shipped_dit_samples_the_requested_class(scorer):
    model = load_model("fmnist-dit")
    labels = torch.arange(60) % 10
    images = sample(model, 60, SamplerConfig("ddim", 20), seed=11, labels=labels, progress=False).images
    assert scorer.score(images, labels)["class_accuracy"] >= 0.7


@needs_fmnist
def test_evaluate_reports_agreement_with_itself(scorer):
    model = load_model("fmnist-unet")
    protocol = EvalProtocol("tiny", SamplerConfig("ddim", 5), num_samples=20, batch_size=20)
    first = evaluate(model, protocol, scorer, progress=False)
    again = evaluate(model, protocol, scorer, reference_images=first.images, progress=False)
    assert again.metrics["psnr_vs_ref"] == pytest.approx(100.0) and again.metrics["ssim_vs_ref"] == pytest.approx(1.0)


def test_reference_statistics_are_read_back_from_the_cache(tmp_path, monkeypatch):
    from diffquant.data.images import ImageSet
    from diffquant.evaluation import reference

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path))
    images = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = ImageSet(images, torch.arange(40) % 10, 10, "tiny-set")
    monkeypatch.setattr(reference, "load_reference_images", lambda *_: real)
    first = reference.reference_stats("tiny-set")
    monkeypatch.setattr(reference, "extract_features", lambda *_: pytest.fail("the cached statistics were recomputed"))
    again = reference.reference_stats("tiny-set")
    assert torch.equal(again.spatial, first.spatial)
    assert (again.pooled_stats.mean == first.pooled_stats.mean).all()
