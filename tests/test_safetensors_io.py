"""The streaming safetensors writer: layout, out-of-order and concurrent writes, direct I/O, the running sha256."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from w4a8conv.errors import BadInputError
from w4a8conv.safetensors_io import (
    ITEMSIZE,
    OutputEntry,
    ShardWriter,
    StagingPool,
    dtype_name,
    layout_header,
    read_header,
    read_tensor,
    reads_direct,
    staging,
    syscalls,
)
from w4a8conv.safetensors_io import writer as writer_module

TENSORS = {
    "a.weight": torch.arange(4096 * 3, dtype=torch.int32).reshape(4096, 3),
    "a.scale": torch.arange(96, dtype=torch.int64),
    "odd.bytes": torch.arange(7, dtype=torch.int8),  # 7 bytes
    "odd.halves": torch.arange(3, dtype=torch.bfloat16),  # 6 bytes
    "odd.floats": torch.arange(5, dtype=torch.float32),  # 20 bytes
    "b.weight": torch.full((2048, 1024), -3, dtype=torch.int8),
    "empty": torch.empty(0, 4, dtype=torch.float32),
    "b.bias": torch.linspace(-1, 1, 64, dtype=torch.float32),
}


def _entries() -> list[OutputEntry]:
    return [OutputEntry(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in TENSORS.items()]


def test_layout_keeps_the_given_order_and_aligns_every_tensor():
    header, ranges = layout_header(_entries(), {"format": "pt"})
    assert len(header) % 8 == 0
    order = sorted(ranges, key=lambda name: ranges[name])
    # multiples of 8 bytes in the given order, then the rest by descending item size
    assert order == ["a.weight", "a.scale", "b.weight", "empty", "b.bias", "odd.floats", "odd.halves", "odd.bytes"]
    for entry in _entries():
        begin, end = ranges[entry.name]
        assert begin % ITEMSIZE[entry.dtype] == 0 and end - begin == entry.nbytes
    spans = sorted(ranges.values())
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(spans))  # no gaps: the format forbids them


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writes_in_any_order_from_threads_give_the_file_and_its_sha256(tmp_path, seed):
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _entries(), {"format": "pt"})
    names = list(TENSORS)
    random.Random(seed).shuffle(names)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: writer.write_tensor(name, TENSORS[name]), names))
    assert not path.exists()  # only the .partial until finish
    digest = writer.finish()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor), name


def test_without_checksum_the_file_is_the_same_and_finish_returns_none(tmp_path):
    files = {}
    for checksum in (True, False):
        path = tmp_path / f"{checksum}.safetensors"
        writer = ShardWriter(path, _entries(), {"format": "pt"}, checksum=checksum)
        for name in reversed(TENSORS):
            writer.write_tensor(name, TENSORS[name])
        digest = writer.finish()
        assert (digest is None) is (not checksum)
        files[checksum] = path.read_bytes()
    assert files[True] == files[False]


def test_finish_refuses_a_file_with_a_missing_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "out.safetensors", _entries())
    for name in list(TENSORS)[1:]:
        writer.write_tensor(name, TENSORS[name])
    with pytest.raises(AssertionError, match=r"never written: \['a\.weight'\]"):
        writer.finish()
    writer.abandon()  # what convert does with an unfinished writer: the memory it held goes back

    assert not (tmp_path / "out.safetensors").exists()


def test_the_hash_falls_back_to_reading_where_files_cannot_be_mapped(tmp_path, monkeypatch):
    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap gives on filesystems without it

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _entries())
    for name in reversed(TENSORS):
        writer.write_tensor(name, TENSORS[name])
    assert writer.finish() == hashlib.sha256(path.read_bytes()).hexdigest()


# Large enough to go direct (>= 1 MiB), with sizes that are not whole blocks, so that they start and end
# inside blocks and the partial blocks at either end take the buffered path.
LARGE = {
    "big.first": torch.arange(300_001, dtype=torch.int32),  # 1,200,004 bytes
    "small.between": torch.arange(10, dtype=torch.int64),
    "big.second": (torch.arange(1_500_003, dtype=torch.int32) * 7).to(torch.int8),
    "big.third": torch.linspace(-3, 3, 700_001, dtype=torch.float64),
}


def _large_entries() -> list[OutputEntry]:
    return [OutputEntry(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in LARGE.items()]


def _record_pwrites(monkeypatch) -> list[tuple[bool, int, int]]:
    """Spy on os.pwrite: (through an O_DIRECT descriptor, offset, length) of every call."""
    calls: list[tuple[bool, int, int]] = []
    real = os.pwrite

    def spy(fd, data, offset):
        calls.append((_is_direct(fd), offset, memoryview(data).nbytes))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return calls


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _check_file(path, digest, tensors):
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("seed", [0, 1])
def test_large_tensors_go_direct_in_whole_blocks_and_the_file_is_exact(tmp_path, monkeypatch, seed):
    calls = _record_pwrites(monkeypatch)
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries())
    if not writer.writes_direct:
        pytest.skip("this filesystem takes no O_DIRECT")
    names = list(LARGE)
    random.Random(seed).shuffle(names)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda name: writer.write_tensor(name, LARGE[name]), names))
    direct = [(offset, length) for is_direct, offset, length in calls if is_direct]
    _check_file(path, writer.finish(), LARGE)
    assert len(direct) == 3  # one per large tensor, all of it but the partial blocks at its ends
    assert all(offset % 4096 == 0 and length % 4096 == 0 and length > 1_000_000 for offset, length in direct)


def test_direct_writes_past_the_retention_limit_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "RETAINED_BYTES", 2_000_000)
    calls = _record_pwrites(monkeypatch)
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries())
    if not writer.writes_direct:
        pytest.skip("this filesystem takes no O_DIRECT")
    # In the file: small.between, big.third, big.first, big.second (sizes not a multiple of 8 go last).
    # big.third waits for small.between to be hashed and holds its 5.6 MB buffer meanwhile, so
    # big.second cannot be held as well and goes through the page cache; by the time big.first
    # comes nothing is held.
    for name in ["big.third", "big.second", "small.between", "big.first"]:
        writer.write_tensor(name, LARGE[name])
    direct = [offset for is_direct, offset, _ in calls if is_direct]
    inside = [name for offset in direct for name, (b, e) in writer.ranges.items() if b <= offset < e]
    assert inside == ["big.third", "big.first"]
    _check_file(path, writer.finish(), LARGE)


def test_a_file_that_refuses_direct_writes_is_written_through_the_page_cache(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def refuse_direct(fd, data, offset):
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries())
    took_direct = writer.writes_direct
    monkeypatch.setattr(os, "pwrite", refuse_direct)
    for name in LARGE:
        writer.write_tensor(name, LARGE[name])
    assert len(refused) == (1 if took_direct else 0)  # tried once, then never again
    assert not writer.writes_direct
    _check_file(path, writer.finish(), LARGE)


def test_without_o_direct_every_write_is_buffered(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries())
    assert not writer.writes_direct
    for name in reversed(LARGE):
        writer.write_tensor(name, LARGE[name])
    _check_file(path, writer.finish(), LARGE)


@pytest.mark.parametrize(("piece", "direct"), [(1 << 20, True), (64 << 20, True), (1 << 20, False)])
def test_copies_are_verbatim_in_pieces_direct_or_not(tmp_path, monkeypatch, piece, direct):
    monkeypatch.setattr(writer_module, "STAGED_COPY_BYTES", piece)
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    source = tmp_path / "in.safetensors"
    save_file(LARGE, source)
    infos = read_header(source).tensors
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries())
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda name: writer.copy_tensor(name, infos[name]), reversed(LARGE)))
    _check_file(path, writer.finish(), LARGE)


def test_a_source_that_shrinks_during_a_copy_is_named(tmp_path):
    source = tmp_path / "in.safetensors"
    save_file(LARGE, source)
    infos = read_header(source).tensors
    os.truncate(source, infos["big.second"].begin + 100)
    writer = ShardWriter(tmp_path / "out.safetensors", _large_entries())
    with pytest.raises(BadInputError, match=r"in\.safetensors: tensor big\.second: file ended"):
        writer.copy_tensor("big.second", infos["big.second"])


def test_copies_fall_back_to_read_and_write_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    def no_kernel_copy(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    monkeypatch.setattr(syscalls, "COPY_CHUNK", 1 << 20)  # several pieces per tensor
    source = tmp_path / "in.safetensors"
    save_file(LARGE, source)
    infos = read_header(source).tensors
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _large_entries(), direct_io=False)
    for name in LARGE:
        writer.copy_tensor(name, infos[name])
    _check_file(path, writer.finish(), LARGE)


# --- direct reads -------------------------------------------------------------------------------------


def _large_file(tmp_path):
    """A safetensors file of LARGE (tensors at offsets inside blocks; the file is no whole number of blocks)."""
    path = tmp_path / "in.safetensors"
    save_file(LARGE, path)
    assert path.stat().st_size % 4096
    return path, read_header(path).tensors


def _record_direct_preadv(monkeypatch) -> list[tuple[int, int]]:
    """Spy on os.preadv: (offset, length) of every read through an O_DIRECT descriptor."""
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd, buffers, offset, *flags):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spy)
    return calls


def _takes_direct_reads(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_direct_reads_give_the_same_tensors_in_whole_blocks(tmp_path, monkeypatch):
    path, infos = _large_file(tmp_path)
    if not _takes_direct_reads(path):
        pytest.skip("this filesystem takes no O_DIRECT")
    calls = _record_direct_preadv(monkeypatch)
    for name, tensor in LARGE.items():
        assert torch.equal(read_tensor(infos[name], direct=True), tensor), name
    # the three tensors of 1 MiB or more, the last one up to the end of the file; the small one buffered
    assert len(calls) == 3 and all(offset % 4096 == 0 and length % 4096 == 0 for offset, length in calls)
    assert [reads_direct(infos[name]) for name in LARGE] == [True, False, True, True]
    assert not any(reads_direct(infos[name], direct=False) for name in LARGE)


def test_direct_read_of_a_truncated_file_names_it_and_the_tensor(tmp_path):
    path, infos = _large_file(tmp_path)
    os.truncate(path, infos["big.third"].begin + 4096 * 100 + 5)
    with pytest.raises(BadInputError, match=rf"{path}: tensor big.third: file ended before its last byte"):
        read_tensor(infos["big.third"], direct=True)


@pytest.mark.parametrize("where", ["open", "read"])
def test_direct_reads_refused_by_the_filesystem_fall_back_to_buffered(tmp_path, monkeypatch, where):
    _, infos = _large_file(tmp_path)
    real_open, real_preadv = os.open, os.preadv
    refused: list[str] = []

    def refuse_open(file, flags, *args):
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args)

    def refuse_read(fd, buffers, offset, *flags):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("read")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *flags)

    if where == "open":
        monkeypatch.setattr(os, "open", refuse_open)
    elif _takes_direct_reads(tmp_path / "in.safetensors"):
        monkeypatch.setattr(os, "preadv", refuse_read)
    else:
        pytest.skip("this filesystem takes no O_DIRECT")
    for name, tensor in LARGE.items():
        assert torch.equal(read_tensor(infos[name], direct=True), tensor), name
    assert refused == [where] * 3  # each large tensor tried direct once


def test_staging_buffers_are_reused_for_requests_of_about_their_size():
    # Requests for one tensor differ by where its first block starts; a buffer must serve them all,
    # or the pool fills with buffers nothing can use (peak RSS grew 30-50% from 2 to 8 GB).
    pool = StagingPool(idle_limit=64 << 20)
    first = pool.take(7_340_032 + 100)
    assert first.ctypes.data % 4096 == 0 and len(first) >= 7_340_132
    pool.give(first)
    again = pool.take(7_340_032 + 4000)
    assert again is first


def test_direct_read_memory_goes_back_to_the_pool_once_the_tensor_is_gone(tmp_path, monkeypatch):
    _, infos = _large_file(tmp_path)
    pool = StagingPool(idle_limit=64 << 20)
    monkeypatch.setattr(staging, "STAGING", pool)
    tensor = read_tensor(infos["big.third"], direct=True)
    view = tensor[1:]
    del tensor
    assert pool.idle_buffers == 0  # a view still uses it
    del view
    assert pool.idle_buffers == 1
    again = read_tensor(infos["big.third"], direct=True)
    assert pool.idle_buffers == 0  # reused
    assert torch.equal(again, LARGE["big.third"])
