"""The shard writer: a safetensors file laid out header first, each tensor written at its offset.

No output shard is ever held in memory: tensors arrive in any order from worker threads and are
written where the header says, pass-through tensors copied file to file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import staging
from .hashing import PrefixHasher
from .header import ITEMSIZE, OutputEntry, TensorInfo, dtype_name, layout_header
from .staging import BLOCK, Staged
from .syscalls import COPY_CHUNK, allocate, copy_range, name_file, pwrite_all, read_exactly, truncated

if TYPE_CHECKING:
    import torch

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
STAGED_COPY_BYTES = 8 << 20  # pass-through tensors are staged in pieces of this size
# Direct-written bytes the process may hold in memory until each shard's hash reaches them, all shards
# together, so that memory does not grow with the number of shards being written at once.
RETAINED_BYTES = 128 << 20  # 32 MiB cost CPU (docs/performance.md, "The budgets")


class _Retention:
    """The process's count of retained bytes against :data:`RETAINED_BYTES` (read at call time)."""

    def __init__(self) -> None:
        self._held = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more; with nothing held, any one tensor fits."""
        with self._lock:
            if self._held and self._held + nbytes > RETAINED_BYTES:
                return False
            self._held += nbytes
            return True

    def free(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


_RETENTION = _Retention()


class ShardWriter:
    """Write a safetensors file tensor by tensor, each at its planned offset, in any order.

    The file is written as ``<name>.partial``; :meth:`finish` checks every tensor arrived, fsyncs and
    renames it, so a file under its final name is always complete. Its sha256 is computed while it
    is written (unless ``checksum`` is False), by a :class:`~.hashing.PrefixHasher`.

    Large tensors, and pass-through copies in pieces, are written with ``O_DIRECT`` from a staging
    buffer, bypassing the page cache: the device reads our memory, where a buffered write has the CPU
    copy every byte into freshly allocated cache pages and write them back at the end. Their
    block-aligned middle goes direct, the partial blocks at either end through the page cache, and
    the buffer is kept until the hash reaches it. Small tensors, and every write on filesystems that
    refuse ``O_DIRECT``, go through the page cache and are hashed from there.

    Args:
        path: the final file name.
        entries: every tensor the file holds.
        metadata: the header's ``__metadata__``.
        direct_io: write large tensors with O_DIRECT where the filesystem takes it.
        checksum: compute the file's sha256.
        as_save_file: lay the tensors out as ``safetensors.save_file`` does (see :func:`.layout_header`).
    """

    def __init__(
        self,
        path: Path,
        entries: Iterable[OutputEntry],
        metadata: dict[str, str] | None = None,
        direct_io: bool = True,
        checksum: bool = True,
        as_save_file: bool = False,
    ):
        entries = list(entries)
        self.path = path
        self.partial_path = path.with_name(path.name + ".partial")
        header, self.ranges = layout_header(entries, metadata, as_save_file)
        self._pending = set(self.ranges)
        self._entries = {e.name: e for e in entries}
        self.size = len(header) + sum(e.nbytes for e in entries)
        self._parts: dict[str, int] = {}  # bytes written so far of tensors written in parts
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._direct = False  # large tensors go direct
        try:
            # Never through a link: an old partial file (or a link planted there) goes first.
            with contextlib.suppress(FileNotFoundError):
                self.partial_path.unlink()
            fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            try:
                # Reserve every block now: a full disk fails here, before any work, and the writes into
                # allocated space are cheaper than filling holes of a sparse file.
                allocate(fd, self.size)
                pwrite_all(fd, memoryview(header), 0)
            finally:
                os.close(fd)
        except OSError as e:
            raise name_file(e, self.partial_path) from None
        if direct_io:
            try:
                os.close(os.open(self.partial_path, os.O_WRONLY | os.O_DIRECT | _NOFOLLOW))
                self._direct = True
            except (OSError, AttributeError):
                pass  # no direct I/O on this filesystem (EINVAL) or platform: every write is buffered
        self._hasher = PrefixHasher(self.partial_path, self._release) if checksum else None
        self._written_range(0, len(header))

    @property
    def writes_direct(self) -> bool:
        """Whether large tensors go to this file with O_DIRECT (False once the device refused it)."""
        return self._direct

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (which must match the planned dtype and shape) at its offset."""
        entry = self._entries[name]
        import torch

        assert dtype_name(tensor.dtype) == entry.dtype and tuple(tensor.shape) == entry.shape, (
            f"{name} planned as {entry.dtype}{list(entry.shape)}, produced {tensor.dtype}{list(tensor.shape)}"
        )
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        begin, end = self.ranges[name]
        if not self._write_staged(begin, len(data), lambda staged: np.copyto(staged, data)):
            self._pwrite_all(memoryview(data), begin)
            self._written_range(begin, end)
        self._pending.discard(name)

    def write_rows_of(self, name: str, tensor: torch.Tensor, start: int, total: int) -> None:
        """Write ``tensor``, the part of the planned tensor ``name`` for rows ``[start, ...)`` of ``total``
        along the one axis where their shapes differ (words and scales: the last; scale_bias: the first).

        Each part is a run of equal slices, written with one open descriptor. The tensor counts as
        written, for the hash too, once all its parts are: recorded slice by slice, a tensor split
        into many parts left hundreds of thousands of ranges waiting in the hasher.
        """
        entry = self._entries[name]
        shape = tuple(tensor.shape)
        assert dtype_name(tensor.dtype) == entry.dtype and len(shape) == len(entry.shape), (name, shape)
        axes = [i for i, (part, whole) in enumerate(zip(shape, entry.shape, strict=True)) if part != whole]
        if not axes:
            self.write_tensor(name, tensor)
            return
        assert len(axes) == 1, f"{name}: {shape} differs from {entry.shape} on more than one axis"
        axis = axes[0]
        import torch

        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        itemsize = ITEMSIZE[entry.dtype]
        inner = math.prod(entry.shape[axis + 1 :]) * itemsize  # bytes of one step along the axis
        piece = shape[axis] * inner  # bytes of one slice of the part
        stride = entry.shape[axis] * inner  # bytes between two slices in the file
        offset = start * entry.shape[axis] // total * inner
        begin = self.ranges[name][0] + offset
        with self._write_lock, self._opened(os.O_WRONLY) as fd:
            try:
                for i in range(math.prod(shape[:axis])):
                    pwrite_all(fd, memoryview(data[i * piece : (i + 1) * piece]), begin + i * stride)
            except OSError as e:
                raise name_file(e, self.partial_path) from None
        with self._lock:
            self._parts[name] = self._parts.get(name, 0) + data.size
            complete = self._parts[name] == entry.nbytes
        if complete:
            self._written_range(*self.ranges[name])
            self._pending.discard(name)

    def copy_tensor(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor's bytes verbatim from a source file, in pieces.

        Pieces of 1-8 MiB are read into a staging buffer and written direct; the rest, and every piece
        where direct writes are off, are copied by the kernel (``copy_file_range``) where it can.
        """
        begin, end = self.ranges[name]
        assert end - begin == source.nbytes, f"{name} planned with {end - begin} bytes, source has {source.nbytes}"
        piece = STAGED_COPY_BYTES if self._direct else COPY_CHUNK
        with open(source.path, "rb", buffering=0) as src, self._opened(os.O_WRONLY) as fd:
            for done in range(0, source.nbytes, piece):
                size = min(piece, source.nbytes - done)
                where = source.begin + done
                read = functools.partial(read_exactly, source, src.fileno(), where)
                if self._write_staged(begin + done, size, read):
                    continue
                try:
                    copied = copy_range(src.fileno(), where, fd, begin + done, size)
                except OSError as e:
                    raise name_file(e, self.partial_path) from None
                if copied != size:
                    raise truncated(source)
                self._written_range(begin + done, begin + done + size)
        self._pending.discard(name)

    def abandon(self) -> None:
        """Stop without finishing: the partial file stays (a resume rewrites it), held memory is given back."""
        if self._hasher is not None:
            self._hasher.abandon()

    def finish(self) -> str | None:
        """Fsync and rename the complete file; returns its sha256 (hex), or None without ``checksum``.

        Call it once every write has returned: by then the digest covers the whole file.
        """
        assert not self._pending, f"{self.path.name}: tensors never written: {sorted(self._pending)[:3]}"
        assert self._hasher is None or self._hasher.hashed == self.size, f"{self.path.name}: not all hashed"
        with self._opened(os.O_RDWR) as fd:
            try:
                os.fsync(fd)
            except OSError as e:
                raise name_file(e, self.partial_path) from None
        try:
            os.replace(self.partial_path, self.path)
        except OSError as e:
            raise name_file(e, self.path) from None
        return None if self._hasher is None else self._hasher.hexdigest()

    @contextlib.contextmanager
    def _opened(self, flags: int) -> Iterator[int]:
        """The partial file, open for one operation: a writer holds no descriptor between them, so a
        conversion's open files do not grow with its shard count."""
        try:
            fd = os.open(self.partial_path, flags | _NOFOLLOW)
        except OSError as e:
            raise name_file(e, self.partial_path) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _release(self, staged: Staged) -> None:
        _RETENTION.free(len(staged.data))
        staging.STAGING.give(staged.buffer)

    def _write_staged(self, begin: int, nbytes: int, fill: Callable[[np.ndarray], None]) -> bool:
        """Write ``nbytes`` at ``begin`` that ``fill`` puts into a staging array, whole blocks with O_DIRECT.

        The bytes are staged so that file offset ``x`` sits at a block-aligned address exactly when
        ``x`` is block-aligned, which is what O_DIRECT asks of both; the partial blocks at either end
        go through the page cache. Returns False, having done nothing, for ranges too small to be
        worth it, when this file takes no direct writes, or when too much is held for the hash.
        """
        if nbytes < staging.DIRECT_MIN_BYTES or not self._direct or not _RETENTION.reserve(nbytes):
            return False
        pad = begin % BLOCK
        buffer = staging.STAGING.take(pad + nbytes)
        staged = Staged(buffer, buffer[pad : pad + nbytes])
        try:
            fill(staged.data)
        except BaseException:
            self._release(staged)
            raise
        end = begin + nbytes
        first, last = -(-begin // BLOCK) * BLOCK, end // BLOCK * BLOCK  # whole blocks: [first, last)
        view = memoryview(buffer)[: pad + nbytes]
        base = begin - pad  # file offset of view[0]
        try:
            with self._opened(os.O_WRONLY | os.O_DIRECT) as fd:
                pwrite_all(fd, view[first - base : last - base], first)
            self._pwrite_all(view[pad : first - base], begin)
            self._pwrite_all(view[last - base :], last)
        except OSError as e:
            if e.errno != errno.EINVAL:
                self._release(staged)
                raise name_file(e, self.partial_path) from None
            # The device wants more alignment than we give (or the filesystem no direct I/O after all):
            # from now on this file is written through the page cache.
            self._direct = False
            try:
                self._pwrite_all(view[pad:], begin)
            finally:
                self._release(staged)
            self._written_range(begin, end)
            return True
        self._written_range(begin, end, staged)
        return True

    def _pwrite_all(self, data: bytes | memoryview, offset: int) -> None:
        # A buffered write holds the file's inode lock while it copies, and the kernel lets the other
        # writers of the file spin on it, burning a core: this file's writers queue on a lock of ours
        # instead, where they sleep.
        view = memoryview(data).cast("B")
        if not view:
            return
        with self._write_lock, self._opened(os.O_WRONLY) as fd:
            try:
                pwrite_all(fd, view, offset)
            except OSError as e:
                raise name_file(e, self.partial_path) from None

    def _written_range(self, begin: int, end: int, staged: Staged | None = None) -> None:
        if begin == end:
            return
        if self._hasher is not None:
            self._hasher.written(begin, end, staged)
        elif staged is not None:  # nothing to hash: the staged bytes are on disk and can go
            self._release(staged)
