"""diffquant: quantization for diffusion models.

import diffquant
model = diffquant.load("fmnist-unet")
quantized = diffquant.quantize(model, "ptq4dm", wbits=4, abits=8)
diffquant.save(quantized, "fmnist-unet-w4a8")
"""

import logging as _logging

from diffquant.version import __version__

# Optional peer libraries (torchao) log import-time noise through diffusers and torch on CPU-only
# machines (missing CUDA .so files, enum registrations); it says nothing about diffquant's work.
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from diffquant.api import (  # noqa: E402
    load,
    load_lora,
    loaded_adapters,
    quantize,
    record_calibration,
    save,
    set_adapters,
    set_lora_scale,
    unload_lora,
)

__all__ = [
    "__version__",
    "load",
    "load_lora",
    "loaded_adapters",
    "quantize",
    "record_calibration",
    "save",
    "set_adapters",
    "set_lora_scale",
    "unload_lora",
]
