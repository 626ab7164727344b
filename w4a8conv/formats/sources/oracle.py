"""What ``verify`` asks of a source layout, answered with numpy straight from W4A8_FORMATS.md.

An oracle shares no code with the converter's math (``packing``, ``scales``, a layout's torch
methods): the operator words are rebuilt from the source's int4 values by shifts, where the
converter transposes bytes and reinterprets them, and biases are recomputed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BIAS_ROWS = 64  # rows of float64 bias terms computed at once: a few MB, which stay in the cache


@dataclass
class SourceArrays:
    """One projection as ``verify`` read it from the source, scales as the serving kernel uses them."""

    raw: np.ndarray  # the weight as stored
    out_features: int
    scale: np.ndarray  # float32 [out]
    second: np.ndarray | None  # float32 [out, groups], or None per channel
    stored_bias: np.ndarray | None  # the source's own scale_bias, if it has one


class SourceOracle:
    """verify's model of one source layout."""

    scale_bias_origin: str  # where the expected scale_bias comes from, for verify's message

    def int4_values(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        """A source weight's int4 values, int16 ``[out, in]``."""
        raise NotImplementedError

    def operator_words(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        """The operator words, transposed (uint32 ``[out/8, in]``), that hold the weight's int4 values."""
        raise NotImplementedError

    def weight_problem(self, raw: np.ndarray) -> str | None:
        """What makes the stored weight impossible to convert, if anything."""
        return None

    def expected_scale_bias(self, arrays: SourceArrays, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """The scale_bias a conversion must hold, ``[out, chunks]``, and the tolerance for each value."""
        raise NotImplementedError


def signed_nibble(packed: np.ndarray, position: int) -> np.ndarray:
    """Nibble ``position`` (0: the lowest 4 bits) of each unsigned integer in ``packed``, as -8..7.

    Shifted to the top of the integer, then arithmetically back down, which sign-extends it.
    """
    bits = packed.dtype.itemsize * 8
    return (packed << (bits - 4 - 4 * position)).view(f"int{bits}") >> (bits - 4)


def words_from_rows(raw: np.ndarray, out_features: int, values_per_byte: int) -> np.ndarray:
    """Operator words ``[out/8, in]``: value ``8m+j`` in bits ``4j..4j+3`` of word m, from bytes that
    hold ``values_per_byte`` consecutive output rows each (low nibble first).

    Word m is bytes ``8m/values_per_byte ...`` of the rows, the first lowest. Comparing words, not
    values unpacked from them, keeps the comparison at a quarter of a byte per value.
    """
    unsigned = raw.view(np.uint8)
    # In place, with no zeroed memory: fresh pages cost more in faults than the arithmetic here.
    words = np.empty((out_features // 8, raw.shape[1]), dtype=np.uint32)
    part = np.empty_like(words)
    pieces = 8 // values_per_byte
    for i in range(pieces):
        part[...] = unsigned[i::pieces]
        if values_per_byte == 1:
            part &= 0xF
        part <<= 32 // pieces * i
        if i:
            words |= part
        else:
            words[...] = part
    return words


def dequantized(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``values * scale`` in float64, ``[rows, in]``, ``scale`` ``[rows, groups]`` applying to groups of columns."""
    rows, k = values.shape
    weights = values.astype(np.float64).reshape(rows, scale.shape[1], k // scale.shape[1])
    weights *= scale.astype(np.float64)[:, :, None]  # in place: one float64 matrix, not three
    return weights.reshape(rows, k)


def recomputed_scale_bias(values: np.ndarray, scale: np.ndarray, second, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """``8 * sum_k w[o,k] * s[o, k//g]`` per input chunk in float64, and what a correct fp32 result may differ by.

    The converter sums in float64 in another order and rounds to fp32 once: the result may differ
    by one fp32 step, plus float64 rounding that can only matter where terms cancel (a few 1e-16
    of the terms' magnitude per addition; at most ~10,000 additions).
    """
    n, k = values.shape
    second = np.ones((n, 1), dtype=np.float32) if second is None else second
    expected, tolerance = np.empty((n, chunks)), np.empty((n, chunks))
    # Every term in float64, a few rows at a time: whole-matrix temporaries (three of 8 bytes per
    # value) spent as much time in page faults as in arithmetic.
    for start in range(0, n, _BIAS_ROWS):
        rows = slice(start, start + _BIAS_ROWS)
        group_scale = scale[rows, None].astype(np.float64) * second[rows].astype(np.float64)
        terms = dequantized(values[rows], group_scale).reshape(-1, chunks, k // chunks)
        expected[rows] = 8 * terms.sum(-1)
        tolerance[rows] = 2e-12 * 8 * np.abs(terms).sum(-1)
    tolerance += np.spacing(np.abs(expected).astype(np.float32))
    return expected, tolerance
