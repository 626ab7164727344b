"""Int4 packing: pure functions on tensors, no I/O.

Three layouts of the same int4 values (-8..7) meet here (W4A8_FORMATS.md, "Packing"):

* mindie: int8 ``[out, in]``, one value per byte.
* msModelSlim 1.0.0: int8 ``[out/2, in]``; ``byte[i, k] = (w[2i, k] & 0xF) | (w[2i+1, k] << 4)``.
* operator layout: int32 ``[in, out/8]``; element ``8m+j`` of a row sits in bits ``4j..4j+3`` of
  word ``m``, two's-complement nibbles, the word read as little-endian.

The operator layout is the 1.0.0 bytes transposed to ``[in, out/2]`` and read four bytes at a time,
so mindie weights are first packed into 1.0.0 bytes (which halves the data before the transpose)
and both layouts then share one path. All functions act on the last two dims, so a stack of
experts ``[E, out, in]`` works as well as one matrix.
"""

from __future__ import annotations

import sys

import torch

INT4_MIN = -8
INT4_MAX = 7

if sys.byteorder != "little":  # pragma: no cover - every Ascend, CUDA and x86/Arm host is little-endian
    raise ImportError("w4a8conv assumes a little-endian host: the operator words are little-endian int32")


def int4_range_violation(values: torch.Tensor) -> tuple[int, int] | None:
    """Return ``(min, max)`` of ``values`` when any lies outside -8..7, else None."""
    lo, hi = int(values.min()), int(values.max())
    if lo < INT4_MIN or hi > INT4_MAX:
        return lo, hi
    return None


def pack_int4_pairs_along_rows(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 int4 values ``[..., out, in]`` into msModelSlim 1.0.0 bytes ``[..., out/2, in]``.

    Even output rows go to the low nibble, odd rows to the high nibble. Values must be in -8..7
    (check with :func:`int4_range_violation` first) and ``out`` even.
    """
    if values.dtype != torch.int8:
        raise TypeError(f"expected int8 int4 values, got {values.dtype}")
    if values.shape[-2] % 2:
        raise ValueError(f"output dim {values.shape[-2]} is odd; int4 pairs need an even one")
    low = values[..., 0::2, :]
    high = values[..., 1::2, :]
    # (low & 0xF) | (high << 4), as one add: the nibbles don't overlap, and 16 * high + (0..15) stays
    # inside int8 (-128..127) for high in -8..7; faster than the three-op form (docs/performance.md).
    return torch.add(low & 0x0F, high, alpha=16)


def unpack_int4_pairs_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs_along_rows`: ``[..., out/2, in]`` bytes to int8 values."""
    low = (packed << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = packed >> 4
    stacked = torch.stack((low, high), dim=-2)  # [..., out/2, 2, in]
    return stacked.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1])


def int4_pair_rows_to_int32_words(packed_rows: torch.Tensor) -> torch.Tensor:
    """Turn 1.0.0 bytes ``[..., out/2, in]`` into operator words int32 ``[..., in, out/8]``."""
    if packed_rows.dtype != torch.int8:
        raise TypeError(f"expected int8 packed rows, got {packed_rows.dtype}")
    if packed_rows.shape[-2] % 4:
        raise ValueError(f"output dim {packed_rows.shape[-2] * 2} is not divisible by 8")
    # torch transposes uint8 in larger blocks than int8 (faster, docs/performance.md); the bytes are the same.
    transposed = packed_rows.view(torch.uint8).transpose(-1, -2).contiguous()
    # Viewing through 1-D avoids torch's stride check on size-1 dims, which contiguous() may leave odd.
    return transposed.reshape(-1).view(torch.int32).reshape(*transposed.shape[:-1], transposed.shape[-1] // 4)


def pack_int4_to_int32(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 int4 values ``[..., out, in]`` into operator words int32 ``[..., in, out/8]``.

    The result equals ``npu_convert_weight_to_int4pack(values.T.int())`` and
    ``npu_quantize(values.T.float(), [1.0], None, quint4x2, -1, False)``.
    """
    return int4_pair_rows_to_int32_words(pack_int4_pairs_along_rows(values))


def unpack_int32_words(words: torch.Tensor) -> torch.Tensor:
    """Operator words int32 ``[..., in, out/8]`` back to int8 int4 values ``[..., out, in]``."""
    if words.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {words.dtype}")
    flat = words.contiguous().reshape(-1).view(torch.int8)
    packed_rows = flat.reshape(*words.shape[:-1], words.shape[-1] * 4).transpose(-1, -2)
    return unpack_int4_pairs_along_rows(packed_rows)
