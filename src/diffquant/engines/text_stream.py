"""The text stream of a text-to-image denoiser: which quantized layers see the prompt embedding's tokens
(and its BOS token, MixDQ's and DGQ's outlier)."""

from __future__ import annotations

from torch import nn

from diffquant.calibration import CalibrationSet, call_denoiser
from diffquant.calibration.validation import text_token_count
from diffquant.modules.policy import pattern_matches
from diffquant.modules.structure import text_stream_layers


def text_layers(
    denoiser: nn.Module,
    calibration: CalibrationSet,
    names: list[str],
    patterns: tuple[str, ...] | None,
    method: str,
) -> list[str]:
    """The layers among `names` fed the text stream: those matching `patterns`, or, without patterns,
    those found by running the model once (a model without text input raises, naming `method`)."""
    tokens = text_token_count(calibration, method)
    if patterns is not None:
        return [n for n in names if any(pattern_matches(p, n) for p in patterns)]
    batch = next(calibration.batches(2))
    found = set(text_stream_layers(denoiser, lambda: call_denoiser(denoiser, batch), tokens))
    return [n for n in names if n in found]
