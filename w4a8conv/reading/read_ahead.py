"""Read-ahead for the conversion's units of work: the kernel reads later units' sources while earlier ones run."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from ..safetensors_io import TensorInfo, prefetch

READ_AHEAD_BYTES = 256 * 1024 * 1024


class ReadAhead:
    """Keep the kernel reading the sources of the next units while the workers process earlier ones.

    On a disk with high latency, a worker's synchronous read of a 7 MB weight leaves the disk
    idle between requests; hinting about ``window`` bytes beyond the furthest unit started keeps
    it streaming. The page cache holds what is read ahead, not this process.
    """

    def __init__(self, units: list[list[TensorInfo]], window: int = READ_AHEAD_BYTES):
        self._units = units
        # _starts[i]: bytes of the units before unit i, so any run of units is sized by one subtraction
        self._starts = list(itertools.accumulate((sum(i.nbytes for i in unit) for unit in units), initial=0))
        self._window = window
        self._furthest = -1  # furthest unit started
        self._next = 0  # first unit not hinted yet
        self._lock = threading.Lock()

    def around(self, index: int, work: Callable[..., None], *args: object) -> None:
        """Run ``work(*args)`` as unit ``index``, first hinting at the units after it."""
        with self._lock:
            self._furthest = max(self._furthest, index)
            start = self._next = max(self._next, self._furthest + 1)
            beyond = self._starts[self._furthest + 1]  # where the units not started yet begin
            while self._next < len(self._units) and self._starts[self._next] - beyond < self._window:
                self._next += 1
            stop = self._next
        for unit in self._units[start:stop]:
            prefetch(unit)
        work(*args)
