"""Number formats: integers of any width 1-16 bits and floating-point ExMy with bias and subnormals.

Formats are plain frozen dataclasses; `parse_format("int4")`, `parse_format("e4m3")` and friends give
the common ones. Rounding onto a format's grid lives in `functional.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffquant.errors import ConfigError

MAX_INT_BITS = 16


@dataclass(frozen=True)
class IntFormat:
    """A `bits`-wide integer grid: codes in [-2^(b-1), 2^(b-1)-1] when signed, else [0, 2^b-1]."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_INT_BITS:
            raise ConfigError(f"Integer bit width must be between 1 and {MAX_INT_BITS}, got {self.bits}.")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def storage_bits(self) -> int:
        return self.bits


@dataclass(frozen=True)
class FloatFormat:
    """A sign + `exponent_bits` + `mantissa_bits` floating-point grid.

    `special` says which codes are not finite numbers: "ieee" reserves the top exponent for Inf/NaN
    (E5M2), "fn" reserves only the all-ones code for NaN (E4M3FN), "none" makes every code finite
    (the OCP MX FP6/FP4 element formats). Subnormals are always represented.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    special: str = "none"

    def __post_init__(self) -> None:
        if not 1 <= self.exponent_bits <= 8 or not 0 <= self.mantissa_bits <= 10:
            raise ConfigError(
                f"Float format E{self.exponent_bits}M{self.mantissa_bits} is out of range (E1-E8, M0-M10)."
            )
        if self.special not in ("ieee", "fn", "none"):
            raise ConfigError(f"special must be 'ieee', 'fn' or 'none', got '{self.special}'.")

    @property
    def exponent_bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1 if self.bias is None else self.bias

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.exponent_bias

    @property
    def max_exponent(self) -> int:
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.special == "ieee" else top) - self.exponent_bias

    @property
    def max_value(self) -> float:
        mantissa_levels = 2**self.mantissa_bits
        largest = mantissa_levels - 1
        if self.special == "fn":
            largest -= 1  # the all-ones mantissa at the top exponent is NaN
        if largest < 0:  # M0 with "fn": the top exponent holds only NaN
            return 2.0 ** (self.max_exponent - 1)
        return 2.0**self.max_exponent * (1 + largest / mantissa_levels)

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)

    @property
    def name(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}"

    @property
    def storage_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits


@dataclass(frozen=True)
class BinaryFormat:
    """Sign binarisation: every value becomes +-scale (1 bit per element)."""

    @property
    def name(self) -> str:
        return "binary"

    @property
    def storage_bits(self) -> int:
        return 1


@dataclass(frozen=True)
class ScaledFloatFormat:
    """A block-scaled float format: `block` consecutive `element` values share one encoded scale.

    `scale_encoding` "e8m0" is the OCP MX v1.0 shared scale (a power of two, 8-bit biased exponent);
    "e4m3" is NVIDIA's NVFP4 block scale (an E4M3 number times one fp32 scale per tensor).
    """

    element: FloatFormat
    block: int
    scale_encoding: str
    label: str

    @property
    def name(self) -> str:
        return self.label

    @property
    def storage_bits(self) -> int:
        return self.element.storage_bits

    @property
    def max_value(self) -> float:
        return self.element.max_value


@dataclass(frozen=True)
class LogFormat:
    """A base-2 logarithmic grid for non-negative values (softmax probabilities; DGQ, Ryu et al. 2025):
    code q in [0, 2^bits - 1] stands for scale * 2^-q, so small probabilities keep relative precision."""

    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_INT_BITS:
            raise ConfigError(f"Log format bit width must be between 1 and {MAX_INT_BITS}, got {self.bits}.")

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def name(self) -> str:
        return f"log{self.bits}"

    @property
    def storage_bits(self) -> int:
        return self.bits


NumberFormat = IntFormat | FloatFormat | BinaryFormat | ScaledFloatFormat | LogFormat

NAMED_FLOAT_FORMATS: dict[str, FloatFormat] = {
    "e4m3": FloatFormat(4, 3, special="fn"),  # = torch.float8_e4m3fn, max 448
    "e5m2": FloatFormat(5, 2, special="ieee"),  # = torch.float8_e5m2, max 57344
    "e3m2": FloatFormat(3, 2),  # OCP MX FP6, max 28
    "e2m3": FloatFormat(2, 3),  # OCP MX FP6, max 7.5
    "e2m1": FloatFormat(2, 1),  # OCP MX FP4 / NVFP4 element, max 6
    "e3m0": FloatFormat(3, 0),  # powers of two, max 16
}
SCALED_FLOAT_FORMATS: dict[str, ScaledFloatFormat] = {
    "nvfp4": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e2m1"], 16, "e4m3", "nvfp4"),  # NVIDIA NVFP4
    "mxfp4": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e2m1"], 32, "e8m0", "mxfp4"),  # OCP MX v1.0
    "mxfp6_e3m2": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e3m2"], 32, "e8m0", "mxfp6_e3m2"),
    "mxfp6_e2m3": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e2m3"], 32, "e8m0", "mxfp6_e2m3"),
    "mxfp8": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e4m3"], 32, "e8m0", "mxfp8"),  # MXFP8 E4M3
    "mxfp8_e5m2": ScaledFloatFormat(NAMED_FLOAT_FORMATS["e5m2"], 32, "e8m0", "mxfp8_e5m2"),
}
_INT_PATTERN = re.compile(r"^(u?)int(\d+)$")
_FLOAT_PATTERN = re.compile(r"^e(\d)m(\d+)$")
_LOG_PATTERN = re.compile(r"^log(\d+)$")


def parse_format(name: str) -> NumberFormat:
    """'int8', 'uint4', 'e4m3', 'e2m1', 'e3m4' (any ExMy, all codes finite), 'binary', 'log4' (base-2 log
    grid), or a block-scaled float: nvfp4, mxfp4, mxfp6_e3m2, mxfp6_e2m3, mxfp8, mxfp8_e5m2."""
    key = name.strip().lower()
    if key == "binary":
        return BinaryFormat()
    if key in SCALED_FLOAT_FORMATS:
        return SCALED_FLOAT_FORMATS[key]
    if key in NAMED_FLOAT_FORMATS:
        return NAMED_FLOAT_FORMATS[key]
    if match := _INT_PATTERN.match(key):
        return IntFormat(int(match.group(2)), signed=not match.group(1))
    if match := _FLOAT_PATTERN.match(key):
        return FloatFormat(int(match.group(1)), int(match.group(2)))
    if match := _LOG_PATTERN.match(key):
        return LogFormat(int(match.group(1)))
    raise ConfigError(
        f"Unknown number format '{name}'. Use intN/uintN (N = 1..16), an ExMy float such as "
        f"{', '.join(NAMED_FLOAT_FORMATS)}, a block-scaled float ({', '.join(SCALED_FLOAT_FORMATS)}), "
        "logN (base-2 log grid) or 'binary'."
    )


def int_format_for_bits(bits: int, signed: bool = True) -> IntFormat:
    """The integer format of a bit width, with the range check that names the problem."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_INT_BITS:
        raise ConfigError(f"Bit width must be an integer between 1 and {MAX_INT_BITS}, got {bits!r}.")
    return IntFormat(bits, signed)
