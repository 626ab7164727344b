"""The system calls under the reader and the writer: whole reads and writes, allocation, kernel copies.

Every OSError that leaves here names its file, so the one-line message can say which.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .header import TensorInfo

COPY_CHUNK = 64 * 1024 * 1024  # bytes one copy_file_range (or read and write) moves at most


def name_file(error: OSError, path: Path) -> OSError:
    """Name the file an OSError is about, so the message can say which (os.pwrite does not)."""
    if error.filename is None:
        error.filename = str(path)
    return error


def truncated(source: TensorInfo) -> BadInputError:
    return BadInputError(f"{source.path}: tensor {source.name}: file ended before its last byte ({source.end})")


def read_exactly(source: TensorInfo, fd: int, offset: int, buffer: np.ndarray) -> None:
    """Fill ``buffer`` from ``offset`` of ``source``'s open file; a file that ends first is truncated."""
    view = memoryview(buffer).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)  # one read returns at most ~2 GiB on Linux
        if not n:
            raise truncated(source)
        got += n


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for the file (a sparse file where the filesystem cannot allocate)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # filesystems without fallocate (some network filesystems)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> int:
    """Copy ``count`` bytes between file offsets; returns how many were copied (short at EOF)."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        todo = min(COPY_CHUNK, count - done)
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, todo, src_offset + done, dst_offset + done)
            except OSError:
                use_kernel = False  # e.g. EXDEV on old kernels or unsupported filesystems
                continue
        else:
            chunk = os.pread(src_fd, todo, src_offset + done)
            n = len(chunk)
            pwrite_all(dst_fd, memoryview(chunk), dst_offset + done)
        if n == 0:
            break
        done += n
    return done
