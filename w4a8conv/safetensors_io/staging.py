"""Block-aligned memory for O_DIRECT reads and writes, pooled for reuse.

Reuse matters: the first touch of a fresh page costs a fault and zeroing (and, in a VM, often a trip
to the host), which for a freshly allocated buffer per tensor was most of a direct write's cost.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

# O_DIRECT wants file offsets, lengths and memory aligned to the device's logical block; 4096 covers
# every block device we know of (a device that wants more makes the write fail and the writer fall back).
BLOCK = 4096
# Tensors (and copy pieces) smaller than this go through the page cache. Read at call time, so a test
# may lower it to send small synthetic tensors down the direct path.
DIRECT_MIN_BYTES = 1 << 20
IDLE_STAGING_BYTES = 128 << 20  # idle buffers the shared pool keeps
POOL_GRANULE = 64 << 10  # buffers come in whole multiples of this


def aligned_empty(nbytes: int) -> np.ndarray:
    """At least ``nbytes`` of uninitialised memory whose first byte is block-aligned, as O_DIRECT asks.

    Sizes are rounded up to whole :data:`POOL_GRANULE` so that a pooled buffer serves every request
    of about its size (requests for one tensor differ by where its first block starts); exact sizes
    filled the pool with buffers nothing could use (docs/performance.md).
    """
    size = -(-nbytes // POOL_GRANULE) * POOL_GRANULE
    raw = np.empty(size + BLOCK, dtype=np.uint8)  # room to start at the next block boundary
    return raw[-raw.ctypes.data % BLOCK :][:size]


class StagingPool:
    """Reused block-aligned buffers; keeps at most ``idle_limit`` bytes of idle ones."""

    def __init__(self, idle_limit: int = IDLE_STAGING_BYTES):
        self._idle: list[np.ndarray] = []
        self._idle_limit = idle_limit
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes whose first byte is block-aligned: the smallest idle
        one that fits, else a new one."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if len(b) >= nbytes]
            if fitting:
                return self._idle.pop(min(fitting, key=lambda i: len(self._idle[i])))
        return aligned_empty(nbytes)

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer taken from the pool; it is kept for reuse while the idle limit allows."""
        with self._lock:
            if sum(len(b) for b in self._idle) + len(buffer) <= self._idle_limit:
                self._idle.append(buffer)

    @property
    def idle_buffers(self) -> int:
        """How many buffers wait for reuse."""
        with self._lock:
            return len(self._idle)


# The process's pool: direct reads and every shard writer share it.
STAGING = StagingPool()


@dataclass
class Staged:
    """A tensor's bytes in a staging buffer, kept until the shard's hash has read them."""

    buffer: np.ndarray  # what goes back to the pool
    data: np.ndarray  # the tensor's bytes: buffer[begin % BLOCK :][:nbytes]
