"""The streaming safetensors writer: layout, out-of-order and concurrent writes, the running sha256."""

from __future__ import annotations

import hashlib
import itertools
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from w4a8conv.errors import W4A8ConvError
from w4a8conv.safetensors_io import ITEMSIZE, OutputEntry, ShardWriter, dtype_name, layout_header

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


def test_finish_refuses_a_file_with_a_missing_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "out.safetensors", _entries())
    for name in list(TENSORS)[1:]:
        writer.write_tensor(name, TENSORS[name])
    with pytest.raises(W4A8ConvError, match=r"never written: a\.weight"):
        writer.finish()
    writer.abort()
    assert not (tmp_path / "out.safetensors").exists()


def test_the_hash_falls_back_to_reading_where_files_cannot_be_mapped(tmp_path, monkeypatch):
    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap gives on filesystems without it

    monkeypatch.setattr("w4a8conv.safetensors_io.mmap.mmap", no_mmap)
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, _entries())
    for name in reversed(TENSORS):
        writer.write_tensor(name, TENSORS[name])
    assert writer.finish() == hashlib.sha256(path.read_bytes()).hexdigest()
