"""The Fashion-MNIST feature network diffquant ships for FID, sFID, IS, precision/recall and accuracy.

A small VGG-style CNN: its 128-d penultimate layer gives the FID features, 16 channels of its 7x7
map give the spatial features of sFID, and its softmax gives the classifier-based Inception Score
and the class accuracy of class-conditional samples. It is trained by `diffquant train-features`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffquant.data.images import ImageSet
from diffquant.errors import DiffquantError
from diffquant.fileio import atomic_file, write_json

WEIGHTS_FILE = Path(__file__).parent / "weights" / "fmnist-features.safetensors"
CARD_FILE = Path(__file__).parent / "weights" / "fmnist-features.json"
SPATIAL_CHANNELS = 16


@dataclass
class Features:
    """Per-image features: `pooled` (N, 128), `spatial` (N, 784) and `logits` (N, 10)."""

    pooled: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FeatureNetwork(nn.Module):
    """28x28 grey image in [-1, 1] -> features and class logits."""

    def __init__(self, num_classes: int = 10, width: int = 32, embedding: int = 128) -> None:
        super().__init__()
        self.block1 = _conv_block(1, width)
        self.block2 = _conv_block(width, 2 * width)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 49, embedding), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(embedding, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).logits

    def features(self, images: torch.Tensor) -> Features:
        h = F.max_pool2d(self.block1(images), 2)
        spatial_map = F.max_pool2d(self.block2(h), 2)  # (N, 64, 7, 7)
        pooled = self.embed(spatial_map)
        return Features(pooled, spatial_map[:, :SPATIAL_CHANNELS].flatten(1), self.head(pooled))


def weights_digest(path: Path = WEIGHTS_FILE) -> str:
    """Short hash of the feature-network weights, used to key cached reference statistics."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_feature_network(path: Path = WEIGHTS_FILE) -> FeatureNetwork:
    if not path.is_file():
        raise DiffquantError(
            f"The feature network weights are missing ({path}). Train them with `diffquant train-features`."
        )
    network = FeatureNetwork()
    network.load_state_dict(load_file(str(path)))
    return network.eval()


@torch.no_grad()
def extract_features(network: FeatureNetwork, images: torch.Tensor, batch_size: int = 500) -> Features:
    """Features of (N, 1, 28, 28) images in [-1, 1], computed in batches."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise DiffquantError(
            f"The Fashion-MNIST feature network takes (N, 1, 28, 28) images, got {tuple(images.shape)}."
        )
    network.eval()
    parts = [network.features(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)]
    return Features(*(torch.cat([getattr(p, k) for p in parts]) for k in ("pooled", "spatial", "logits")))


@torch.no_grad()
def accuracy(network: FeatureNetwork, data: ImageSet) -> float:
    logits = extract_features(network, data.images).logits
    return (logits.argmax(1) == data.labels).float().mean().item()


def train_feature_network(
    train: ImageSet, test: ImageSet, epochs: int = 8, batch_size: int = 128, seed: int = 0, out: Path = WEIGHTS_FILE
) -> dict:
    """Train the feature network (Adam, one-cycle schedule, light shift augmentation); write weights and card."""
    torch.manual_seed(seed)
    network = FeatureNetwork()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=5e-4)
    steps_per_epoch = len(train) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * steps_per_epoch)
    started = time.perf_counter()
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(train))
        bar = tqdm(range(steps_per_epoch), desc=f"features epoch {epoch + 1}/{epochs}")
        for step in bar:
            index = order[step * batch_size : (step + 1) * batch_size]
            images = train.images[index]
            shift = torch.randint(-2, 3, (2,)).tolist()  # small translations generalise better
            images = torch.roll(images, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(network(images), train.labels[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    network.eval()
    test_accuracy = accuracy(network, test)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as scratch:
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(scratch))
    card = {
        "architecture": "2x(conv3-BN-ReLU x2, maxpool) + FC128 + FC10, 28x28 grey input in [-1, 1]",
        "parameters": sum(p.numel() for p in network.parameters()),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "train_wall_time_s": round(time.perf_counter() - started, 1),
        "test_accuracy": round(test_accuracy, 4),
        "features": {"pooled": 128, "spatial": SPATIAL_CHANNELS * 49, "logits": 10},
        "command": f"diffquant train-features --epochs {epochs} --seed {seed}",
    }
    write_json(out.with_suffix(".json"), card)
    return card


def feature_card() -> dict:
    return json.loads(CARD_FILE.read_text()) if CARD_FILE.is_file() else {}
