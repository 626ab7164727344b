"""Where a synthetic checkpoint's random values come from: fast, reproducible, or only shaped.

Writing random int4 data is what ``synthetic`` costs, so the msModelSlim style draws raw 64-bit words
from numpy's SFC64 (about 2.7 GB/s on one core, ten times ``torch.randint`` into int8) and shapes
them with bit operations. The legacy style keeps the torch draws it always made, call for call, so
its files stay byte for byte what w4a8conv wrote before (the golden test's inputs). The shape-only
source builds meta tensors, which measure a layer's bytes without generating it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def seed_of(seed: int, key: object) -> int:
    """A 32-bit seed for one block or projection: the same for the same model seed and key."""
    return zlib.crc32(f"{seed}:{key}".encode())


class TorchRandom:
    """torch's generator, drawn as the legacy style always drew it."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def int4(self, *shape: int) -> torch.Tensor:
        return torch.randint(-8, 8, shape, generator=self.gen, dtype=torch.int8)

    def int8(self, *shape: int) -> torch.Tensor:
        return torch.randint(-128, 128, shape, generator=self.gen, dtype=torch.int8)

    def int32(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen, dtype=torch.int32)

    def uniform(self, scale: float, offset: float, *shape: int) -> torch.Tensor:
        """float32 in ``[offset, offset + scale)``."""
        values = torch.rand(*shape, generator=self.gen) * scale
        return values + offset if offset else values

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def bf16(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(torch.bfloat16)


class FastRandom:
    """numpy's SFC64, raw words shaped by bit operations: the bulk tensors cost about a memory pass."""

    def __init__(self, seed: int) -> None:
        self.bits = np.random.SFC64(seed)
        self.rng = np.random.Generator(self.bits)

    def _bytes(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        words = self.bits.random_raw((count + 7) // 8)
        return words.view(np.int8)[:count].reshape(shape)

    def int4(self, *shape: int) -> torch.Tensor:
        # An arithmetic shift keeps a random byte's high nibble, sign-extended: uniform over -8..7.
        return torch.from_numpy(self._bytes(shape) >> 4)

    def int8(self, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self._bytes(shape))

    def int32(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(low, high, shape, dtype=np.int32))

    def uniform(self, scale: float, offset: float, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset))

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.standard_normal(shape, dtype=np.float32))

    def bf16(self, *shape: int) -> torch.Tensor:
        """Random sign and significand, exponent 120..123 (magnitudes 2^-7 to 2^-3): finite weights of
        a trained model's size, without a float conversion per element."""
        bits = self._bytes((*shape, 2)).view(np.uint16).reshape(shape)
        return torch.from_numpy((bits & np.uint16(0x81FF)) | np.uint16(0x3C00)).view(torch.bfloat16)


class ShapeOnly:
    """Meta tensors: every shape and dtype of a layer, no values, no memory."""

    @staticmethod
    def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    def int4(self, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.int8)

    def int8(self, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.int8)

    def int32(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.int32)

    def uniform(self, scale: float, offset: float, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.float32)

    def normal(self, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.float32)

    def bf16(self, *shape: int) -> torch.Tensor:
        return self._empty(shape, torch.bfloat16)


Random = TorchRandom | FastRandom | ShapeOnly
