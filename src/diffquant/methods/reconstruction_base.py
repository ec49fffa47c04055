"""What the reconstruction-based methods share: engine settings, presets and resumable checkpoints."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from diffquant.cache import cache_dir
from diffquant.calibration import CalibrationSet
from diffquant.engines import ReconstructionCheckpoint, ReconstructionConfig, Reconstructor, fingerprint
from diffquant.methods.base import MethodConfig


@dataclass
class ReconstructionMethodConfig(MethodConfig):
    """A method config with a reconstruction engine and a checkpoint directory."""

    wbits: int = 4
    abits: int | None = 8
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    blocks: tuple[str, ...] | None = None
    """Module-name patterns of the blocks reconstructed as one unit (None: every ResNet, attention and
    transformer block); layers outside them are reconstructed one by one."""
    checkpoint_dir: str | None = None
    """Where per-unit checkpoints go; None = the diffquant cache. Rerunning the same quantization
    resumes from there; the checkpoint is deleted when the run finishes."""

    def validate(self) -> None:
        super().validate()
        self.reconstruction.validate()


def start_reconstruction(
    denoiser: nn.Module,
    full_precision: nn.Module,
    calibration: CalibrationSet,
    config: ReconstructionMethodConfig,
    progress: bool,
    frozen_layers=(),
) -> Reconstructor:
    """A Reconstructor whose checkpoint is keyed by the model, the calibration data and the config."""
    key = fingerprint(full_precision.state_dict(), calibration.sample, calibration.timestep, config.to_json())
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else cache_dir() / "reconstruction"
    checkpoint = ReconstructionCheckpoint(root / f"{config.name}-{key}", key)
    return Reconstructor(
        denoiser, full_precision, calibration, config.reconstruction, checkpoint, progress, frozen_layers
    )


def finish_reconstruction(reconstructor: Reconstructor) -> dict:
    """The run is complete: its checkpoint is no longer needed. Returns, for a resumed run, what the
    earlier processes had finished (`earlier_runs_s` is added to the reported calibration time)."""
    if reconstructor.checkpoint is not None:
        shutil.rmtree(reconstructor.checkpoint.directory, ignore_errors=True)
    if not reconstructor.resumed_units:
        return {}
    return {"resumed_units": reconstructor.resumed_units, "earlier_runs_s": round(reconstructor.earlier_runs_s, 2)}


def full_precision_copy(denoiser: nn.Module) -> nn.Module:
    """The untouched model the reconstruction targets come from."""
    return copy.deepcopy(denoiser).eval()
