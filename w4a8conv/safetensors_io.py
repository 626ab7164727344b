"""safetensors files at the byte level: validated headers, ranged reads, and a streaming writer.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data, offsets relative to its start. The ``safetensors`` package reads and writes whole
files; w4a8conv needs three things it does not offer: byte offsets (to copy pass-through tensors
verbatim), reads that do not map a 4 GiB shard into the process (flat memory), and a writer that
lays out the header first and fills each tensor in at its offset, so no output shard is ever held
in memory. This module knows bytes and dtypes, nothing about int4.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadInputError, W4A8ConvError

if TYPE_CHECKING:
    import torch

# safetensors dtype names -> (torch dtype attribute, item size). torch is imported only when a tensor
# is built, so planning and pass-through copying can start while torch is still loading.
_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
ITEMSIZE: dict[str, int] = {name: size for name, (_, size) in _DTYPES.items()}
_NAMES_BY_TORCH = {attr: name for name, (attr, _) in _DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[name][0])


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype, or None."""
    return _NAMES_BY_TORCH.get(str(dtype).removeprefix("torch."))


# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_COPY_CHUNK = 64 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024  # mapped at a time: small, as mapped pages count in RSS
# Map pages that are already in the page cache in one call rather than fault them in one by one.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# O_DIRECT wants file offsets, lengths and memory aligned to the device's logical block; 4096 covers
# every block device we know of (a device that wants more makes the write fail and the writer fall back).
_BLOCK = 4096
_DIRECT_MIN_BYTES = 1 << 20  # smaller tensors go through the page cache
_STAGED_COPY_BYTES = 8 << 20  # pass-through tensors are staged in pieces of this size
_RETAINED_BYTES = 128 << 20  # direct-written bytes a shard may hold in memory until its hash reaches them
_IDLE_STAGING_BYTES = 128 << 20
_POOL_GRANULE = 64 << 10  # staging buffers come in whole multiples of this


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range in the file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_header(path: Path) -> ShardHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Raises:
        BadInputError: naming the file (and tensor) when the header is malformed, lies about
            offsets or dtypes, or the file is shorter than the header says.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise BadInputError(
                    f"{path}: safetensors header claims {header_len} bytes but the file has {file_size}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise BadInputError(f"{path}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_size)
    _check_no_overlap(path, tensors.values())
    return ShardHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, file_size)


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadInputError(f"{path}: tensor {name}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise BadInputError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadInputError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise BadInputError(f"{path}: tensor {name}: data_offsets {offsets!r} are invalid")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise BadInputError(
            f"{path}: tensor {name}: {dtype}{shape} needs {expected} bytes but data_offsets span {end - begin}"
        )
    if end > data_size:
        raise BadInputError(
            f"{path}: tensor {name}: data ends at byte {end} but the file holds {data_size} data bytes "
            "(truncated shard?)"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: Path, infos: Iterable[TensorInfo]) -> None:
    previous: TensorInfo | None = None
    for info in sorted(infos, key=lambda t: (t.begin, t.end)):
        if previous is not None and info.begin < previous.end and info.nbytes and previous.nbytes:
            raise BadInputError(f"{path}: tensors {previous.name} and {info.name} overlap in the file")
        previous = info


def read_array(info: TensorInfo, direct: bool = False) -> np.ndarray:
    """Read one tensor's bytes (uint8, 1-D) with ``pread`` into memory of their own (no mmap).

    Where :func:`reads_direct` says so, the tensor is read with ``O_DIRECT``: the device writes
    into our memory, where a buffered read has the kernel fill freshly allocated cache pages and copy
    every byte out of them again (14% of a 2 GB conversion's CPU samples, for cache pages that a
    checkpoint larger than memory never reads twice). Filesystems that refuse it get a buffered read.
    """
    if reads_direct(info, direct):
        return _read_direct(info, _aligned_empty(_blocks_around(info)[1]))
    buffer = np.empty(info.nbytes, dtype=np.uint8)
    with open(info.path, "rb", buffering=0) as f:
        _read_exactly(info, f.fileno(), info.begin, buffer)
    return buffer


def read_tensor(info: TensorInfo, direct: bool = False) -> torch.Tensor:
    """Read one tensor as :func:`read_array` does, as a torch tensor of its dtype and shape.

    Direct reads go into pooled memory (a fresh buffer per weight costs a page fault per 4 KiB),
    which returns to the pool once no tensor uses it. That is safe only here: the tensor holds the
    array object itself, where a numpy view of it would hold the pooled buffer's base instead.
    """
    if reads_direct(info, direct):
        memory = _STAGING.take(_blocks_around(info)[1])
        try:
            buffer = _read_direct(info, memory)
        except BaseException:
            _STAGING.give(memory)
            raise
        weakref.finalize(buffer, _STAGING.give, memory)
    else:
        buffer = read_array(info)
    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.from_numpy(buffer).view(info.torch_dtype).reshape(info.shape)


def _blocks_around(info: TensorInfo) -> tuple[int, int]:
    """The first file offset and the length of the whole blocks that hold ``info``'s bytes."""
    first = info.begin - info.begin % _BLOCK
    return first, -(-(info.end - first) // _BLOCK) * _BLOCK


def reads_direct(info: TensorInfo, direct: bool = True) -> bool:
    """Whether reading ``info`` with ``direct`` bypasses the page cache (so prefetching it is wasted)."""
    return direct and info.nbytes >= _DIRECT_MIN_BYTES


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
                if not n or got % _BLOCK:
                    break  # the end of the file (or a short read): the rest, if any, is read buffered
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the device wants more alignment; the rest is read buffered
                raise _name_file(e, info.path) from None
        finally:
            os.close(fd)
    if first + got < info.end:
        with open(info.path, "rb", buffering=0) as f:
            _read_exactly(info, f.fileno(), first + got, raw[got : info.end - first])
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


@dataclass(frozen=True)
class OutputEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def layout_header(
    entries: Iterable[OutputEntry], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a safetensors file: the header bytes (length prefix included) and each tensor's range.

    Tensors keep the order given (the order they are produced in), so a file fills front to back
    and its checksum can follow the writes. The format allows no gaps, so to start every tensor
    aligned to its item size, those whose size is not a multiple of 8 bytes go last, by descending
    item size (as ``safetensors.save_file`` orders all of them).
    """
    entries = list(entries)
    ordered = [e for e in entries if e.nbytes % 8 == 0]
    ordered += sorted((e for e in entries if e.nbytes % 8), key=lambda e: -ITEMSIZE[e.dtype])
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for entry in ordered:
        if entry.name in ranges:
            raise ValueError(f"duplicate output tensor {entry.name}")
        ranges[entry.name] = (offset, offset + entry.nbytes)
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: (len(prefix) + b, len(prefix) + e) for name, (b, e) in ranges.items()}


class _StagingBuffers:
    """Reused block-aligned memory for direct writes.

    Reuse matters: the first touch of a fresh page costs a fault and zeroing (and, in a VM, often a
    trip to the host), which for a freshly allocated buffer per tensor was most of the write's cost.
    """

    def __init__(self, idle_limit: int):
        self._idle: list[np.ndarray] = []
        self._idle_limit = idle_limit
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes whose first byte is block-aligned."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if len(b) >= nbytes]
            if fitting:
                return self._idle.pop(min(fitting, key=lambda i: len(self._idle[i])))
        return _aligned_empty(nbytes)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if sum(len(b) for b in self._idle) + len(buffer) <= self._idle_limit:
                self._idle.append(buffer)


_STAGING = _StagingBuffers(_IDLE_STAGING_BYTES)


def _aligned_empty(nbytes: int) -> np.ndarray:
    """At least ``nbytes`` of uninitialised memory whose first byte is block-aligned, as O_DIRECT asks.

    Sizes are rounded up to whole 64 KiB so that a pooled buffer serves every request of about its
    size (requests for one tensor differ by where its first block starts). Exact-size buffers were
    passed over for requests a few bytes larger, and the pool filled with buffers nothing could use:
    peak RSS grew by 30-50% from a 2 GB to an 8 GB conversion.
    """
    size = -(-nbytes // _POOL_GRANULE) * _POOL_GRANULE
    raw = np.empty(size + _BLOCK, dtype=np.uint8)  # room to start at the next block boundary
    return raw[-raw.ctypes.data % _BLOCK :][:size]


@dataclass
class _Staged:
    """A tensor's bytes in a staging buffer, kept until the shard's hash has read them."""

    buffer: np.ndarray
    data: np.ndarray  # the tensor's bytes: buffer[begin % _BLOCK :][:nbytes]


class ShardWriter:
    """Write a safetensors file tensor by tensor, each at its planned offset, in any order.

    The file is written as ``<name>.partial``; :meth:`finish` checks every tensor arrived, fsyncs and
    renames it, so a file under its final name is always complete. Its sha256 is computed while it
    is written (unless ``checksum`` is False): whichever thread extends the written prefix of the
    file hashes it, so hashing overlaps the conversion instead of re-reading the finished file.

    Large tensors, and pass-through copies in pieces, are written with ``O_DIRECT`` from a staging
    buffer, bypassing the page cache: the device reads our memory, where a buffered write has the CPU
    copy every byte into freshly allocated cache pages and write them back at the end (converting
    8 GB on 2 cores: 10-13 s of system time before, 4 s after). Their block-aligned middle goes
    direct, the partial blocks at either end through the page cache, and the buffer is kept until
    the hash reaches it. Small tensors, and every write on filesystems that refuse ``O_DIRECT``, go
    through the page cache and are hashed from there.
    """

    def __init__(
        self,
        path: Path,
        entries: Iterable[OutputEntry],
        metadata: dict[str, str] | None = None,
        direct_io: bool = True,
        checksum: bool = True,
    ):
        entries = list(entries)
        self.path = path
        self.partial_path = path.with_name(path.name + ".partial")
        header, self.ranges = layout_header(entries, metadata)
        self._pending = set(self.ranges)
        self._entries = {e.name: e for e in entries}
        self.size = len(header) + sum(e.nbytes for e in entries)
        self._digest = hashlib.sha256() if checksum else None
        self._hashed = 0  # bytes [0, _hashed) are in the digest
        # begin -> (end, its bytes if staged) of written ranges past _hashed
        self._written: dict[int, tuple[int, _Staged | None]] = {}
        self._hashing = False  # a thread is extending the digest
        self._retained = 0  # bytes of staged tensors not hashed yet
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._direct_fd = -1
        self._direct = False  # large tensors go direct
        try:
            self._fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _name_file(e, self.partial_path) from None
        try:
            if direct_io:
                self._direct_fd = os.open(self.partial_path, os.O_WRONLY | os.O_DIRECT)
                self._direct = True
        except (OSError, AttributeError):
            pass  # no direct I/O on this filesystem (EINVAL) or platform: every write is buffered
        try:
            # Reserve every block now: a full disk fails here, before any work, and the writes into
            # allocated space are cheaper than filling holes of a sparse file.
            _allocate(self._fd, self.size)
            self._pwrite_all(header, 0)
        except OSError as e:
            self.abort()
            raise _name_file(e, self.partial_path) from None
        self._written_range(0, len(header))

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (which must match the planned dtype and shape) at its offset."""
        entry = self._entries[name]
        import torch

        if dtype_name(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise W4A8ConvError(
                f"internal error: {name} planned as {entry.dtype}{list(entry.shape)}, "
                f"produced {tensor.dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        begin, end = self.ranges[name]
        if not self._write_staged(begin, len(data), lambda staged: np.copyto(staged, data)):
            self._pwrite_all(memoryview(data), begin)
            self._written_range(begin, end)
        self._pending.discard(name)

    def copy_tensor(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor's bytes verbatim from a source file, in pieces.

        Pieces of 1-8 MiB are read into a staging buffer and written direct; the rest, and every piece
        where direct writes are off, are copied by the kernel (``copy_file_range``) where it can.
        """
        begin, end = self.ranges[name]
        if end - begin != source.nbytes:
            raise W4A8ConvError(f"internal error: {name} planned with {end - begin} bytes, source has {source.nbytes}")
        piece = _STAGED_COPY_BYTES if self._direct else _COPY_CHUNK
        with open(source.path, "rb", buffering=0) as src:
            for done in range(0, source.nbytes, piece):
                size = min(piece, source.nbytes - done)
                where = source.begin + done
                read = functools.partial(_read_exactly, source, src.fileno(), where)
                if self._write_staged(begin + done, size, read):
                    continue
                try:
                    copied = _copy_range(src.fileno(), where, self._fd, begin + done, size)
                except OSError as e:
                    raise _name_file(e, self.partial_path) from None
                if copied != size:
                    raise _truncated(source)
                self._written_range(begin + done, begin + done + size)
        self._pending.discard(name)

    def finish(self) -> str | None:
        """Fsync and rename the complete file; returns its sha256 (hex), or None without ``checksum``.

        Call it once every write has returned: by then the digest covers the whole file.
        """
        if self._pending:
            missing = ", ".join(sorted(self._pending)[:3])
            raise W4A8ConvError(f"internal error: {self.path.name}: tensors never written: {missing}")
        if self._digest is not None and self._hashed != self.size:
            raise W4A8ConvError(f"internal error: {self.path.name}: hashed {self._hashed} of {self.size} bytes")
        try:
            os.fsync(self._fd)
            self.abort()
            os.replace(self.partial_path, self.path)
        except OSError as e:
            raise _name_file(e, self.path) from None
        return None if self._digest is None else self._digest.hexdigest()

    def abort(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    def _retain(self, nbytes: int) -> bool:
        """Reserve room to keep a staged tensor until it is hashed; one is always allowed."""
        with self._lock:
            if self._retained and self._retained + nbytes > _RETAINED_BYTES:
                return False
            self._retained += nbytes
            return True

    def _release(self, staged: _Staged) -> None:
        with self._lock:
            self._retained -= len(staged.data)
        _STAGING.give(staged.buffer)

    def _write_staged(self, begin: int, nbytes: int, fill: Callable[[np.ndarray], None]) -> bool:
        """Write ``nbytes`` at ``begin`` that ``fill`` puts into a staging array, whole blocks with O_DIRECT.

        The bytes are staged so that file offset ``x`` sits at a block-aligned address exactly when
        ``x`` is block-aligned, which is what O_DIRECT asks of both; the partial blocks at either end
        go through the page cache. Returns False, having done nothing, for ranges too small to be
        worth it, when this file takes no direct writes, or when too much is held for the hash.
        """
        if nbytes < _DIRECT_MIN_BYTES or not self._direct or not self._retain(nbytes):
            return False
        pad = begin % _BLOCK
        buffer = _STAGING.take(pad + nbytes)
        staged = _Staged(buffer, buffer[pad : pad + nbytes])
        try:
            fill(staged.data)
        except BaseException:
            self._release(staged)
            raise
        end = begin + nbytes
        first, last = -(-begin // _BLOCK) * _BLOCK, end // _BLOCK * _BLOCK  # whole blocks: [first, last)
        view = memoryview(buffer)[: pad + nbytes]
        base = begin - pad  # file offset of view[0]
        try:
            _pwrite_fd(self._direct_fd, view[first - base : last - base], first)
            self._pwrite_all(view[pad : first - base], begin)
            self._pwrite_all(view[last - base :], last)
        except OSError as e:
            if e.errno != errno.EINVAL:
                self._release(staged)
                raise _name_file(e, self.partial_path) from None
            # The device wants more alignment than we give (or the filesystem no direct I/O after all):
            # from now on this file is written through the page cache. The descriptor stays open until
            # the end, as another thread may be writing through it.
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
        # writers of the file spin on it, burning a core (5% of all CPU time with 4 workers here):
        # this file's writers queue on a lock of ours instead, where they sleep.
        try:
            with self._write_lock:
                _pwrite_fd(self._fd, memoryview(data).cast("B"), offset)
        except OSError as e:
            raise _name_file(e, self.partial_path) from None

    def _written_range(self, begin: int, end: int, staged: _Staged | None = None) -> None:
        """Record ``[begin, end)`` as written; hash the file's written prefix unless a thread already is."""
        if begin == end:
            return
        if self._digest is None:  # nothing to hash: the staged bytes are on disk and can go
            if staged is not None:
                self._release(staged)
            return
        with self._lock:
            self._written[begin] = (end, staged)
            if self._hashing:
                return  # that thread picks this range up before it stops
            self._hashing = True
        while True:
            with self._lock:
                start = stop = self._hashed
                ready = []
                while stop in self._written:
                    begin = stop
                    stop, staged = self._written.pop(begin)
                    ready.append((begin, stop, staged))
                if stop == start:
                    self._hashing = False
                    return
            try:
                self._hash_ranges(ready)
            except BaseException:
                with self._lock:
                    self._hashing = False
                raise
            with self._lock:
                self._hashed = stop

    def _hash_ranges(self, ready: list[tuple[int, int, _Staged | None]]) -> None:
        """Hash consecutive written ranges: staged ones from memory, runs of the others from the file."""
        from_file: list[int] = []  # [begin, end] of a run of unstaged ranges
        for begin, end, staged in ready:
            if staged is None:
                from_file = [from_file[0] if from_file else begin, end]
                continue
            if from_file:
                self._hash_file_range(*from_file)
                from_file = []
            self._digest.update(staged.data)
            self._release(staged)
        if from_file:
            self._hash_file_range(*from_file)

    def _hash_file_range(self, offset: int, stop: int) -> None:
        # Hash through a read-only mapping of what was just written: the digest reads the page cache
        # in place, where a read() would copy every byte once more (mapped in pieces to bound RSS).
        # Filesystems that cannot map files get read() instead.
        while offset < stop:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = min(stop, start + _HASH_CHUNK) - start
            try:
                mapped = mmap.mmap(self._fd, length, prot=mmap.PROT_READ, flags=_MAP_FLAGS, offset=start)
            except OSError:
                self._hash_by_reading(offset, start + length)
            else:
                with mapped, memoryview(mapped) as view, view[offset - start :] as piece:
                    self._digest.update(piece)
            offset = start + length

    def _hash_by_reading(self, offset: int, stop: int) -> None:
        try:
            while offset < stop:
                data = os.pread(self._fd, stop - offset, offset)
                if not data:
                    raise W4A8ConvError(f"{self.partial_path}: ended at byte {offset} while reading it back")
                self._digest.update(data)
                offset += len(data)
        except OSError as e:
            raise _name_file(e, self.partial_path) from None


def _name_file(error: OSError, path: Path) -> OSError:
    """Name the file an OSError is about, so the message can say which (os.pwrite does not)."""
    if error.filename is None:
        error.filename = str(path)
    return error


def _truncated(source: TensorInfo) -> BadInputError:
    return BadInputError(f"{source.path}: tensor {source.name}: file ended before its last byte ({source.end})")


def _read_exactly(source: TensorInfo, fd: int, offset: int, buffer: np.ndarray) -> None:
    """Fill ``buffer`` from ``offset`` of ``source``'s open file; a file that ends first is truncated."""
    view = memoryview(buffer).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)  # one read returns at most ~2 GiB on Linux
        if not n:
            raise _truncated(source)
        got += n


def _pwrite_fd(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # filesystems without fallocate (some network filesystems)


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> int:
    """Copy ``count`` bytes between file offsets; returns how many were copied (short at EOF)."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        todo = min(_COPY_CHUNK, count - done)
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, todo, src_offset + done, dst_offset + done)
            except OSError:
                use_kernel = False  # e.g. EXDEV on old kernels or unsupported filesystems
                continue
        else:
            chunk = os.pread(src_fd, todo, src_offset + done)
            n = len(chunk)
            _pwrite_fd(dst_fd, memoryview(chunk), dst_offset + done)
        if n == 0:
            break
        done += n
    return done
