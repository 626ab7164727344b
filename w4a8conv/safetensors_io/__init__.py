"""safetensors files at the byte level: validated headers, ranged reads, and a streaming writer.

The ``safetensors`` package reads and writes whole files; w4a8conv needs three things it does not
offer: byte offsets (to copy pass-through tensors verbatim), reads that do not map a 4 GiB shard
into the process (flat memory), and a writer that lays out the header first and fills each tensor
in at its offset, so no output shard is ever held in memory. One module per job: ``header`` (the
codec), ``reader``, ``staging`` (aligned memory for O_DIRECT), ``hashing`` and ``writer``; the
system calls under them in ``syscalls``. Nothing here knows about int4.
"""

from .hashing import PrefixHasher, sha256_file
from .header import (
    ITEMSIZE,
    MAX_HEADER_BYTES,
    OutputEntry,
    ShardHeader,
    TensorInfo,
    dtype_name,
    file_identity,
    layout_header,
    read_header,
    torch_dtype,
)
from .reader import prefetch, read_array, read_tensor, reads_direct
from .staging import STAGING, StagingPool
from .writer import ShardWriter

__all__ = [
    "ITEMSIZE",
    "MAX_HEADER_BYTES",
    "STAGING",
    "OutputEntry",
    "PrefixHasher",
    "ShardHeader",
    "ShardWriter",
    "StagingPool",
    "TensorInfo",
    "dtype_name",
    "file_identity",
    "layout_header",
    "prefetch",
    "read_array",
    "read_header",
    "read_tensor",
    "reads_direct",
    "sha256_file",
    "torch_dtype",
]
