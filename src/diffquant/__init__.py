"""diffquant: quantization for diffusion models.

import diffquant
model = diffquant.load("fmnist-unet")
quantized = diffquant.quantize(model, "ptq4dm", wbits=4, abits=8)
diffquant.save(quantized, "fmnist-unet-w4a8")
"""

__version__ = "0.1.0"

from diffquant.api import load, quantize, record_calibration, save  # noqa: E402

__all__ = ["__version__", "load", "quantize", "record_calibration", "save"]
