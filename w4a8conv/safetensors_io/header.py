"""The safetensors header codec: dtypes, validated reading of a file's header, laying out a new one.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data, offsets relative to its start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError

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
    identity: str = ""  # size, mtime, inode and header digest: what changes when the file does


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects keep the last of two equal keys silently; a header that names a tensor twice is refused."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return result


def file_identity(stat: os.stat_result, header: bytes = b"") -> str:
    """What identifies a file's version cheaply: size, mtime (ns) and inode, and a digest of its header."""
    digest = f":{hashlib.sha256(header).hexdigest()[:16]}" if header else ""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}{digest}"


def read_header(path: Path) -> ShardHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Raises:
        BadInputError: naming the file (and tensor) when the header is malformed, lies about
            offsets or dtypes, or the file is shorter than the header says.
    """
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            file_size = stat.st_size
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
        # The format says UTF-8; json.loads of bytes would also take UTF-16 and UTF-32.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: safetensors header is not UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: safetensors header is not valid JSON ({e})") from e
    except _DuplicateKey as e:
        raise BadInputError(f"{path}: safetensors header names {e.args[0]!r} twice (JSON keeps only one)") from None
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
    metadata = {str(k): str(v) for k, v in metadata.items()}
    return ShardHeader(path, tensors, metadata, file_size, file_identity(stat, raw))


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


@dataclass(frozen=True)
class OutputEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


# The order in which safetensors.save_file (0.4 to 0.8) lays tensors out: by dtype as here, then by name.
SAVE_FILE_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16")
SAVE_FILE_DTYPE_ORDER += ("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def layout_header(
    entries: Iterable[OutputEntry], metadata: dict[str, str] | None = None, as_save_file: bool = False
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a safetensors file: the header bytes (length prefix included) and each tensor's range.

    Tensors keep the order given (the order they are produced in), so a file fills front to back
    and its checksum can follow the writes. The format allows no gaps, so to start every tensor
    aligned to its item size, those whose size is not a multiple of 8 bytes go last, by descending
    item size. With ``as_save_file``, every tensor goes where ``safetensors.save_file`` puts it, so
    the file is byte for byte the one it writes (widest dtypes first: aligned too).
    """
    entries = list(entries)
    if as_save_file:
        ordered = sorted(entries, key=lambda e: (SAVE_FILE_DTYPE_ORDER.index(e.dtype), e.name))
    else:
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
