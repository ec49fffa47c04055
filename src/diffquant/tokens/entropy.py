"""Lossless coding of token streams: an adaptive arithmetic coder (exact integer arithmetic) and lzma.

The arithmetic coder is the classic Witten-Neal-Cleary coder with 32-bit registers and an adaptive
frequency model kept in a Fenwick tree (every symbol starts with count 1, so nothing needs sending).
"""

from __future__ import annotations

import lzma

import numpy as np

from diffquant.errors import DiffquantError

_PRECISION = 32
_FULL = (1 << _PRECISION) - 1
_HALF = 1 << (_PRECISION - 1)
_QUARTER = 1 << (_PRECISION - 2)
_MAX_TOTAL = 1 << 16  # counts are halved past this, keeping total << QUARTER
_INCREMENT = 24  # adaptation speed: a seen symbol gains this many counts


class _AdaptiveModel:
    """Symbol counts in a Fenwick tree: cumulative counts and symbol search in O(log K)."""

    def __init__(self, alphabet: int):
        self.size = alphabet
        self.counts = [1] * alphabet
        self._rebuild()

    def _rebuild(self) -> None:
        self.tree = [0] * (self.size + 1)
        for i, c in enumerate(self.counts):
            j = i + 1
            while j <= self.size:
                self.tree[j] += c
                j += j & -j
        self.total = sum(self.counts)
        self.top = 1 << (self.size.bit_length() - 1)

    def low(self, symbol: int) -> int:
        """Sum of counts of symbols below `symbol`."""
        total, j = 0, symbol
        while j > 0:
            total += self.tree[j]
            j -= j & -j
        return total

    def find(self, target: int) -> int:
        """The symbol s with low(s) <= target < low(s) + count(s)."""
        position, step = 0, self.top
        while step:
            nxt = position + step
            if nxt <= self.size and self.tree[nxt] <= target:
                position = nxt
                target -= self.tree[nxt]
            step >>= 1
        return position

    def update(self, symbol: int) -> None:
        self.counts[symbol] += _INCREMENT
        self.total += _INCREMENT
        j = symbol + 1
        while j <= self.size:
            self.tree[j] += _INCREMENT
            j += j & -j
        if self.total > _MAX_TOTAL:
            self.counts = [(c + 1) // 2 for c in self.counts]
            self._rebuild()


class _BitWriter:
    def __init__(self):
        self.bytes = bytearray()
        self.current = 0
        self.filled = 0

    def write(self, bit: int) -> None:
        self.current = (self.current << 1) | bit
        self.filled += 1
        if self.filled == 8:
            self.bytes.append(self.current)
            self.current, self.filled = 0, 0

    def finish(self) -> bytes:
        if self.filled:
            self.bytes.append(self.current << (8 - self.filled))
        return bytes(self.bytes)


def arithmetic_encode(symbols: np.ndarray | list[int], alphabet: int) -> bytes:
    """Encode integers in [0, alphabet) with the adaptive model; the decoder needs only the count."""
    model = _AdaptiveModel(alphabet)
    out = _BitWriter()
    low, high, pending = 0, _FULL, 0

    def emit(bit: int) -> None:
        nonlocal pending
        out.write(bit)
        for _ in range(pending):
            out.write(1 - bit)
        pending = 0

    for raw in np.asarray(symbols, dtype=np.int64).reshape(-1).tolist():
        if not 0 <= raw < alphabet:
            raise DiffquantError(f"symbol {raw} is outside the alphabet [0, {alphabet}).")
        span = high - low + 1
        lo = model.low(raw)
        hi = lo + model.counts[raw]
        high = low + span * hi // model.total - 1
        low = low + span * lo // model.total
        while True:
            if high < _HALF:
                emit(0)
            elif low >= _HALF:
                emit(1)
                low -= _HALF
                high -= _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                pending += 1
                low -= _QUARTER
                high -= _QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
        model.update(raw)
    # two more bits pin the final interval
    pending += 1
    emit(0 if low < _QUARTER else 1)
    return out.finish()


def arithmetic_decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """Inverse of `arithmetic_encode` for `count` symbols."""
    model = _AdaptiveModel(alphabet)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    position = 0

    def next_bit() -> int:
        nonlocal position
        bit = bits[position] if position < len(bits) else 0
        position += 1
        return bit

    low, high, value = 0, _FULL, 0
    for _ in range(_PRECISION):
        value = (value << 1) | next_bit()
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        span = high - low + 1
        target = ((value - low + 1) * model.total - 1) // span
        symbol = model.find(target)
        lo = model.low(symbol)
        hi = lo + model.counts[symbol]
        high = low + span * hi // model.total - 1
        low = low + span * lo // model.total
        while True:
            if high < _HALF:  # interval in the lower half: only the shift below is needed
                low, high = 2 * low, 2 * high + 1
                value = (value << 1) | next_bit()
                continue
            if low >= _HALF:
                low -= _HALF
                high -= _HALF
                value -= _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                low -= _QUARTER
                high -= _QUARTER
                value -= _QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
            value = (value << 1) | next_bit()
        out[i] = symbol
        model.update(symbol)
    return out


def lzma_encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Raw little-endian indices (uint8 or uint16) through lzma (xz preset 9, no container checks)."""
    dtype = np.uint8 if alphabet <= 256 else np.uint16
    return lzma.compress(np.asarray(symbols).astype(dtype).tobytes(), format=lzma.FORMAT_RAW, filters=_FILTERS)


def lzma_decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    dtype = np.uint8 if alphabet <= 256 else np.uint16
    raw = lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_FILTERS)
    return np.frombuffer(raw, dtype=dtype)[:count].astype(np.int64)


_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

CODERS = {"arithmetic": (arithmetic_encode, arithmetic_decode), "lzma": (lzma_encode, lzma_decode)}


def empirical_entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    """Total bits of the symbols under their own histogram (a lower bound no static coder beats)."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(probs)).sum())
