"""Reading source and output tensors as numpy arrays, and what verify knows of a source projection."""

from __future__ import annotations

import numpy as np

from ..formats.sources import ModuleHeaders, SourceLayout, detect_source
from ..names import SOURCE_ROLES
from ..safetensors_io import TensorInfo, read_array

_NUMPY = {"I8": np.int8, "I32": np.int32, "I64": np.int64, "F32": np.float32, "F16": np.float16, "F64": np.float64}


def array(info: TensorInfo) -> np.ndarray:
    if info.dtype == "BF16":  # numpy has no bfloat16: widen the bits to float32
        raw = np.fromfile(info.path, dtype=np.uint16, count=info.nbytes // 2, offset=info.begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    # Large tensors bypass the page cache (O_DIRECT): at 8 GB, reading through the cache cost as
    # much system time as the checks' own arithmetic.
    return read_array(info, direct=True).view(_NUMPY[info.dtype]).reshape(info.shape)


def sources(prefix: str, tensors: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    return [(role, tensors[f"{prefix}.{role}"]) for role in SOURCE_ROLES if f"{prefix}.{role}" in tensors]


def source_layout(prefix: str, src: dict[str, TensorInfo]) -> SourceLayout | None:
    """The registered layout of a source projection, from its weight's and scales' shapes."""
    weight, scale = src[f"{prefix}.weight"], src[f"{prefix}.weight_scale"]
    second = src.get(f"{prefix}.weight_scale_second")
    n = scale.shape[0]
    module = ModuleHeaders(
        prefix=prefix,
        proj_name=prefix.rsplit(".", 1)[-1],
        sources=dict(sources(prefix, src)),
        out_features=n,
        in_features=weight.shape[1],
        packed_on_disk=weight.shape[0] * 2 == n,
        per_group=second is not None,
        group_size=0,  # detection reads only how the weight is stored and whether scales are per group
    )
    return detect_source(module)


def source_scales(prefix: str, src: dict[str, TensorInfo]) -> tuple[np.ndarray, np.ndarray | None]:
    """weight_scale float32 ``[out]`` and weight_scale_second float32 ``[out, in/g]`` or None."""
    scale = array(src[f"{prefix}.weight_scale"]).astype(np.float32).reshape(-1)
    second_info = src.get(f"{prefix}.weight_scale_second")
    return scale, array(second_info).astype(np.float32) if second_info is not None else None


def source_module(prefix: str, src: dict[str, TensorInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 values int16 ``[out, in]``, weight_scale float32 ``[out]``, weight_scale_second or None."""
    scale, second = source_scales(prefix, src)
    layout = source_layout(prefix, src)
    if layout is None:
        raise ValueError(f"{prefix}: no known source layout")
    return layout.oracle.int4_values(array(src[f"{prefix}.weight"]), scale.size), scale, second


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` (round to nearest even) and back to float32."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)
