"""verify's check of one W4A8 module: its output tensors re-derived from the source with numpy.

The source side comes from the layout's oracle (``SourceLayout.oracle``, found through the source
registry); the output side is what vllm-ascend 0.23's processing holds (W4A8_FORMATS.md).
"""

from __future__ import annotations

import numpy as np

from ..experts import parse_expert
from ..formats.sources.oracle import SourceArrays
from ..names import ZERO_ROLES
from ..safetensors_io import TensorInfo
from .arrays import array, round_to, source_layout, source_scales
from .report import VerifyReport


def is_moe(prefix: str) -> bool:
    return parse_expert(prefix) is not None


def kernel_scale(prefix: str, scale: np.ndarray, second: np.ndarray | None, params_dtype: str) -> np.ndarray:
    """The per-group (or per-channel) scale ``[out, groups]`` the Ascend kernel applies, float32."""
    if not is_moe(prefix):
        return round_to(scale, params_dtype)[:, None] * round_to(second, params_dtype)
    if second is None:
        return scale[:, None]
    with np.errstate(over="ignore"):
        return (scale[:, None] * second).astype(np.float16).astype(np.float32)


def check_offsets(prefix: str, src: dict[str, TensorInfo], report: VerifyReport) -> None:
    """Non-zero offsets (asymmetric quantization): no output can be a correct conversion of such a source."""
    for role in ZERO_ROLES:
        info = src.get(f"{prefix}.{role}")
        if info is not None and np.any(array(info)):
            report.problem(f"{info.path}: tensor {info.name}: non-zero offsets, which W4A8_DYNAMIC cannot hold")


def check_finite(info: TensorInfo, values: np.ndarray | None, report: VerifyReport) -> None:
    """A NaN or Inf source scale: no conversion may carry it, and NaN would slip past every comparison."""
    if values is not None and not np.all(np.isfinite(values)):
        report.problem(f"{info.path}: tensor {info.name}: holds NaN or Inf")


def check_module(prefix: str, src: dict[str, TensorInfo], out: dict[str, TensorInfo], section, report) -> None:
    layout = source_layout(prefix, src)
    if layout is None:
        report.problem(f"{prefix}: its tensors are in no known source layout")
        return
    oracle = layout.oracle
    check_offsets(prefix, src, report)
    scale, second = source_scales(prefix, src)
    check_finite(src[f"{prefix}.weight_scale"], scale, report)
    if second is not None:
        check_finite(src[f"{prefix}.weight_scale_second"], second, report)
    source = src[f"{prefix}.weight"]
    raw = array(source)
    n, k = scale.size, raw.shape[1]
    words = array(out[f"{prefix}.weight"]).view(np.uint32)  # [in, out/8]
    weight_problem = oracle.weight_problem(raw)
    if weight_problem is not None:
        report.problem(f"{source.path}: tensor {source.name}: {weight_problem}")
    elif words.shape != (k, n // 8) or not np.array_equal(np.ascontiguousarray(words.T), oracle.operator_words(raw, n)):
        report.problem(f"{out[f'{prefix}.weight'].path}: tensor {prefix}.weight: int4 values differ from the source")

    if is_moe(prefix):
        encoded = array(out[f"{prefix}.weight_scale"]).view(np.uint64)
        if np.any(encoded >> np.uint64(32)):
            report.problem(f"{prefix}.weight_scale: int64 scale has high bits set")
        low = (encoded & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        if second is not None:
            with np.errstate(over="ignore"):  # an overflow is what it is: the output must hold the same Inf
                expected = (scale[:, None] * second).astype(np.float16).astype(np.float32).T
        else:
            expected = scale[None, :]
        if low.shape != expected.shape or not np.array_equal(low, expected.view(np.uint32)):
            report.problem(f"{prefix}.weight_scale: differs from the source scales (fp32 bits)")
        used_scale, used_second = scale, second
    else:
        dtype = section.get("params_dtype", "bfloat16")
        used_scale, used_second = round_to(scale, dtype), round_to(second, dtype)
        expected = (used_scale[:, None] * used_second).astype(np.float32).T
        got = array(out[f"{prefix}.weight_scale_second"])
        if got.shape != expected.shape or not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
            report.problem(f"{prefix}.weight_scale_second: differs from the source scales")

    bias = array(out[f"{prefix}.scale_bias"])
    stored_info = src.get(f"{prefix}.scale_bias")
    stored = array(stored_info) if stored_info is not None else None
    if stored_info is not None:
        check_finite(stored_info, stored, report)
    chunks = bias.shape[1] if bias.ndim == 2 else 1
    arrays = SourceArrays(raw, n, used_scale, used_second, stored)
    expected, tolerance = oracle.expected_scale_bias(arrays, chunks)
    if bias.shape != expected.shape or np.any(~(np.abs(bias - expected) <= tolerance)):
        report.problem(f"{prefix}.scale_bias: differs from {oracle.scale_bias_origin}")
