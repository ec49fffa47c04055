"""Engines: the shared machinery that quantization methods compose."""

from diffquant.engines.observation import calibrate_ranges, prepare_model

__all__ = ["calibrate_ranges", "prepare_model"]
