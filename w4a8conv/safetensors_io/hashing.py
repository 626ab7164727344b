"""sha256 of files: whole ones, and ones being written out of order, hashed as their written prefix grows."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import W4A8ConvError
from .staging import Staged
from .syscalls import name_file

_FILE_CHUNK = 16 * 1024 * 1024  # read at a time by sha256_file
_MAP_CHUNK = 8 * 1024 * 1024  # mapped at a time: small, as mapped pages count in RSS
# Map pages that are already in the page cache in one call rather than fault them in one by one.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a whole file."""
    digest = hashlib.sha256()
    chunk = memoryview(bytearray(_FILE_CHUNK))  # reused: a fresh 16 MiB per read costs page faults
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(chunk[:n])
    return digest.hexdigest()


class PrefixHasher:
    """The sha256 of a file written in any order, computed while it is written.

    Writers report each range they finish with :meth:`written`; whichever thread extends the
    written prefix of the file hashes it, so hashing overlaps the writing instead of re-reading the
    finished file. A range reported with its staged bytes is hashed from that memory, which is then
    handed to ``release``; other ranges are hashed from the file, through a read-only mapping of the
    page cache (or ``pread`` where the filesystem cannot map).

    Args:
        path: the file; opened to read a range back, never held open in between.
        release: takes back a staged buffer once it is hashed.
    """

    def __init__(self, path: Path, release: Callable[[Staged], None]):
        self._path = path
        self._release = release
        self._digest = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the digest
        self._written: dict[int, tuple[int, Staged | None]] = {}  # begin -> (end, staged) past _hashed
        self._hashing = False  # a thread is extending the digest
        self._lock = threading.Lock()

    @property
    def hashed(self) -> int:
        """Bytes from the start of the file that are in the digest."""
        return self._hashed

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def written(self, begin: int, end: int, staged: Staged | None = None) -> None:
        """Record ``[begin, end)`` as written; hash the file's written prefix unless a thread already is."""
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

    def abandon(self) -> None:
        """Give back every staged buffer still waiting to be hashed; the digest is not finished."""
        with self._lock:
            waiting, self._written = self._written, {}
        for _, staged in waiting.values():
            if staged is not None:
                self._release(staged)

    def _hash_ranges(self, ready: list[tuple[int, int, Staged | None]]) -> None:
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
        # The digest reads the page cache in place, where a read() would copy every byte once more.
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise name_file(e, self._path) from None
        try:
            while offset < stop:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                length = min(stop, start + _MAP_CHUNK) - start
                try:
                    mapped = mmap.mmap(fd, length, prot=mmap.PROT_READ, flags=_MAP_FLAGS, offset=start)
                except OSError:
                    self._hash_by_reading(fd, offset, start + length)
                else:
                    with mapped, memoryview(mapped) as view, view[offset - start :] as piece:
                        self._digest.update(piece)
                offset = start + length
        finally:
            os.close(fd)

    def _hash_by_reading(self, fd: int, offset: int, stop: int) -> None:
        try:
            while offset < stop:
                data = os.pread(fd, stop - offset, offset)
                if not data:
                    raise W4A8ConvError(f"{self._path}: ended at byte {offset} while reading it back")
                self._digest.update(data)
                offset += len(data)
        except OSError as e:
            raise name_file(e, self._path) from None
