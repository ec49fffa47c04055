"""The numeric core: formats, granularities, observers, fake quantization, packing, quantizers."""

from diffquant.quant.codes import from_codes, to_codes
from diffquant.quant.context import StepState, current_step, step_context
from diffquant.quant.formats import (
    NAMED_FLOAT_FORMATS,
    BinaryFormat,
    FloatFormat,
    IntFormat,
    ScaledFloatFormat,
    int_format_for_bits,
    parse_format,
)
from diffquant.quant.functional import (
    fake_quantize,
    fake_quantize_float,
    fake_quantize_int,
    float_round,
    params_from_range,
    round_ste,
)
from diffquant.quant.granularity import Granularity, group_view, ungroup
from diffquant.quant.observers import (
    EMAMinMaxObserver,
    LpSearchObserver,
    Observer,
    PercentileObserver,
    make_observer,
    shrink_search,
)
from diffquant.quant.packing import pack_codes, packed_size, unpack_codes
from diffquant.quant.quantizer import Quantizer, QuantSpec, invalid_step_sizes, require_valid_step_sizes

__all__ = [
    "invalid_step_sizes",
    "require_valid_step_sizes",
    "NAMED_FLOAT_FORMATS",
    "BinaryFormat",
    "EMAMinMaxObserver",
    "FloatFormat",
    "Granularity",
    "IntFormat",
    "LpSearchObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "Quantizer",
    "ScaledFloatFormat",
    "StepState",
    "current_step",
    "fake_quantize",
    "fake_quantize_float",
    "fake_quantize_int",
    "float_round",
    "from_codes",
    "group_view",
    "int_format_for_bits",
    "make_observer",
    "pack_codes",
    "parse_format",
    "packed_size",
    "params_from_range",
    "round_ste",
    "shrink_search",
    "step_context",
    "to_codes",
    "unpack_codes",
    "ungroup",
]
