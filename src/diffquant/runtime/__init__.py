"""Runtime: quantized-model storage (and, later, real-kernel export)."""

from diffquant.runtime.storage import is_quantized_directory, load_quantized, save_quantized

__all__ = ["is_quantized_directory", "load_quantized", "save_quantized"]
