"""Inception-v3 FID through torch-fidelity, only with weights the user already has on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.data.images import to_uint8
from diffquant.errors import DiffquantError


class _UInt8RGB(torch.utils.data.Dataset):
    """Grey [-1, 1] images as the 3-channel uint8 tensors torch-fidelity expects."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = to_uint8(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights_path: str | Path | None) -> float:
    """FID on Inception-v3 pool features between two image sets in [-1, 1].

    Nothing is downloaded: `weights_path` must point at torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth` (or a compatible file) on local disk.
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise DiffquantError(
            "Inception FID needs local Inception-v3 weights and diffquant downloads nothing: pass "
            "--inception-weights PATH to torch-fidelity's 'weights-inception-2015-12-05-6726825d.pth'. "
            "The shipped Fashion-MNIST feature network gives FID without them."
        )
    try:
        import torch_fidelity
    except Exception as error:  # missing, or torchvision that does not match this torch build
        raise DiffquantError(
            f"Inception FID needs torch-fidelity and a torchvision matching your torch ({error}). "
            "Install them with `pip install 'diffquant[fidelity]'` on a torch build that has a torchvision wheel."
        ) from error
    metrics = torch_fidelity.calculate_metrics(
        input1=_UInt8RGB(samples),
        input2=_UInt8RGB(reference),
        fid=True,
        feature_extractor_weights_path=str(weights_path),
        cuda=torch.cuda.is_available(),
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])
