"""Checks of values before a conversion writes anything: every W4A8 module's scales must be finite.

Planning reads headers only; these reads are the exception. Scales are small beside the weights:
``weight_scale`` is one value per output row, ``weight_scale_second`` one per group of 256 inputs,
``scale_bias`` at most 16 per row (about 1.5% of a DeepSeek-R1 checkpoint, read through the page
cache, where processing finds them again). A NaN or Inf found here is refused before the first shard,
where processing would find it only when it reached that module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BadInputError
from ..formats.projection import Projection
from ..safetensors_io import TensorInfo
from ..safetensors_io.syscalls import read_exactly

SCALE_ROLES = ("weight_scale", "weight_scale_second", "scale_bias")
_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_READERS = 8  # reads in flight: small ones, whose latency is the cost


_BUFFERS = threading.local()  # one reused buffer a reader: fresh memory per tensor cost more than the reads


def _finite(info: TensorInfo) -> bool:
    if info.dtype not in _FLOATS and info.dtype != "BF16":
        return True  # integers hold no NaN
    buffer = getattr(_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < info.nbytes:
        buffer = _BUFFERS.buffer = np.empty(max(info.nbytes, 1 << 20), dtype=np.uint8)
    raw = buffer[: info.nbytes]
    with open(info.path, "rb", buffering=0) as f:
        read_exactly(info, f.fileno(), info.begin, raw)
    if info.dtype == "BF16":  # numpy has no bfloat16: its bits are the high half of a float32's
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view(_FLOATS[info.dtype])
    return bool(np.isfinite(values).all())


def check_scales_are_finite(modules: Iterable[Projection]) -> None:
    """Raise BadInputError naming the first scale tensor that holds NaN or Inf."""
    infos = [m.sources[role] for m in modules for role in SCALE_ROLES if role in m.sources]
    with ThreadPoolExecutor(_READERS, thread_name_prefix="preflight") as pool:
        for info, finite in zip(infos, pool.map(_finite, infos), strict=True):
            if not finite:
                raise BadInputError(f"{info.path}: tensor {info.name}: holds NaN or Inf")
