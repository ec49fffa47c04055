"""Probe-only patch (imported with SYMFQ=1): recentre every uint8 FakeQuantize grid of our graph on zero.

It prices the int8 kernels OpenVINO picks for symmetric grids, nothing more: the numbers no longer match
the calibrated model. `activation_symmetric=True` and `attention_symmetric=True` calibrate such grids.
"""

from diffquant.runtime import kernels_openvino

_original_init = kernels_openvino.OpenVINOFakeQuantize.__init__


def _symmetric_init(self, quantizer) -> None:
    _original_init(self, quantizer)
    if self.low == 0 and self.high == 255:
        self.bank = [(scale, 128) for scale, _ in self.bank]  # zero-point 0 in int8, shifted into uint8


kernels_openvino.OpenVINOFakeQuantize.__init__ = _symmetric_init
