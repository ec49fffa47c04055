"""Engines: the shared machinery that quantization methods compose."""

from diffquant.engines.allocation import Allocation, allocate_bits
from diffquant.engines.gptq import GPTQConfig, HessianAccumulator, gptq_layer
from diffquant.engines.observation import calibrate_ranges, prepare_model, probe
from diffquant.engines.reconstruction import (
    ReconstructionCheckpoint,
    ReconstructionConfig,
    Reconstructor,
    fingerprint,
)
from diffquant.engines.temporal import reconstruct_temporal
from diffquant.engines.units import ReconstructionUnit, discover_units

__all__ = [
    "Allocation",
    "GPTQConfig",
    "HessianAccumulator",
    "allocate_bits",
    "gptq_layer",
    "ReconstructionCheckpoint",
    "ReconstructionConfig",
    "ReconstructionUnit",
    "Reconstructor",
    "calibrate_ranges",
    "discover_units",
    "fingerprint",
    "prepare_model",
    "probe",
    "reconstruct_temporal",
]
