"""Reading tensors: ranged reads into memory of their own (no mmap), direct where it pays, and read-ahead hints.

Reads never map a 4 GiB shard into the process, so memory stays flat whatever the checkpoint.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from . import staging
from .header import TensorInfo
from .staging import BLOCK, aligned_empty
from .syscalls import name_file, read_exactly

if TYPE_CHECKING:
    import torch


def read_array(info: TensorInfo, direct: bool = False) -> np.ndarray:
    """Read one tensor's bytes (uint8, 1-D) with ``pread`` into memory of their own (no mmap).

    Where :func:`reads_direct` says so, the tensor is read with ``O_DIRECT``: the device writes
    into our memory, where a buffered read has the kernel fill freshly allocated cache pages and copy
    every byte out of them again, for cache pages that a checkpoint larger than memory never reads
    twice (docs/performance.md). Filesystems that refuse it get a buffered read.
    """
    if reads_direct(info, direct):
        return _read_direct(info, aligned_empty(_blocks_around(info)[1]))
    buffer = np.empty(info.nbytes, dtype=np.uint8)
    with open(info.path, "rb", buffering=0) as f:
        read_exactly(info, f.fileno(), info.begin, buffer)
    return buffer


def read_tensor(info: TensorInfo, direct: bool = False) -> torch.Tensor:
    """Read one tensor as :func:`read_array` does, as a torch tensor of its dtype and shape.

    Direct reads go into pooled memory (a fresh buffer per weight costs a page fault per 4 KiB),
    which returns to the pool once no tensor uses it. That is safe only here: the tensor holds the
    array object itself, where a numpy view of it would hold the pooled buffer's base instead.
    """
    if reads_direct(info, direct):
        memory = staging.STAGING.take(_blocks_around(info)[1])
        try:
            buffer = _read_direct(info, memory)
        except BaseException:
            staging.STAGING.give(memory)
            raise
        weakref.finalize(buffer, staging.STAGING.give, memory)
    else:
        buffer = read_array(info)
    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.from_numpy(buffer).view(info.torch_dtype).reshape(info.shape)


def _blocks_around(info: TensorInfo) -> tuple[int, int]:
    """The first file offset and the length of the whole blocks that hold ``info``'s bytes."""
    first = info.begin - info.begin % BLOCK
    return first, -(-(info.end - first) // BLOCK) * BLOCK


def reads_direct(info: TensorInfo, direct: bool = True) -> bool:
    """Whether reading ``info`` with ``direct`` bypasses the page cache (so prefetching it is wasted)."""
    return direct and info.nbytes >= staging.DIRECT_MIN_BYTES


def _read_direct(info: TensorInfo, memory: np.ndarray) -> np.ndarray:
    """Read ``info``'s bytes with O_DIRECT: the whole blocks around them into the aligned ``memory``.

    Returns the tensor's bytes, a view into ``memory``, which must hold those blocks.
    """
    first, need = _blocks_around(info)
    raw = memory[:need]
    view = memoryview(raw)
    got = 0
    try:
        fd = os.open(info.path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        fd = -1  # no direct I/O on this filesystem or platform
    if fd >= 0:
        try:
            while got < need:
                n = os.preadv(fd, [view[got:]], first + got)
                got += n
                if not n or got % BLOCK:
                    break  # the end of the file (or a short read): the rest, if any, is read buffered
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the device wants more alignment; the rest is read buffered
                raise name_file(e, info.path) from None
        finally:
            os.close(fd)
    if first + got < info.end:
        with open(info.path, "rb", buffering=0) as f:
            read_exactly(info, f.fileno(), first + got, raw[got : info.end - first])
    return raw[info.begin - first : info.end - first]


def prefetch(infos: Iterable[TensorInfo]) -> None:
    """Have the kernel start reading these tensors into the page cache, without waiting for them.

    A hint (``posix_fadvise(WILLNEED)``): a source on a slow or remote disk is read ahead while the
    workers still process earlier tensors. Errors are ignored; the real read reports them.
    """
    for info in infos:
        if not info.nbytes:
            continue
        try:
            fd = os.open(info.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
