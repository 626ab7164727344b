"""Scale encodings and the scale_bias term: pure functions on tensors, no I/O.

Shapes follow the checkpoint: ``weight_scale [out, 1]``, ``weight_scale_second [out, in/g]``,
int4 values ``[out, in]``. Outputs are already in the operator's ``[in/g, out]`` orientation.
"""

from __future__ import annotations

import math

import torch

_LOW_32_BITS = 0xFFFFFFFF
_MAX_INT16_SEGMENT = 4096


def encode_fp32_bits_as_int64(values: torch.Tensor) -> torch.Tensor:
    """Zero-extend the fp32 bit pattern of each element into an int64 (high 32 bits zero).

    This is what vllm-ascend builds with numpy (``view(uint32)`` then widen) for the MoE kernels.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"expected float32, got {values.dtype}")
    return values.contiguous().view(torch.int32).to(torch.int64) & _LOW_32_BITS


def decode_int64_to_fp32(encoded: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_fp32_bits_as_int64`; raises if any high 32 bits are set."""
    if encoded.dtype != torch.int64:
        raise TypeError(f"expected int64, got {encoded.dtype}")
    if bool(((encoded >> 32) != 0).any()):
        raise ValueError("int64 scale has non-zero high 32 bits")
    as_signed = torch.where(encoded >= 2**31, encoded - 2**32, encoded)
    return as_signed.to(torch.int32).view(torch.float32)


def moe_per_group_scale(weight_scale: torch.Tensor, weight_scale_second: torch.Tensor) -> torch.Tensor:
    """Per-group MoE scale as the kernel reads it: int64 ``[in/g, out]``.

    ``(weight_scale * weight_scale_second)`` in fp32 (vllm-ascend 0.23 holds MoE scales in fp32),
    rounded through float16, then encoded with :func:`encode_fp32_bits_as_int64`.
    """
    product = weight_scale.to(torch.float32) * weight_scale_second.to(torch.float32)
    rounded = product.to(torch.float16).to(torch.float32)
    return encode_fp32_bits_as_int64(rounded.transpose(-1, -2).contiguous())


def moe_per_channel_scale(weight_scale: torch.Tensor) -> torch.Tensor:
    """Per-channel MoE scale: int64 ``[1, out]``, the fp32 bits of ``weight_scale``, no fp16 rounding."""
    return encode_fp32_bits_as_int64(weight_scale.to(torch.float32).transpose(-1, -2).contiguous())


def linear_antiquant_scale(
    weight_scale: torch.Tensor, weight_scale_second: torch.Tensor, params_dtype: torch.dtype
) -> torch.Tensor:
    """Antiquant scale of a W4A8 Linear: float32 ``[in/g, out]``.

    vllm-ascend creates the Linear's scale parameters in the model's dtype (``params_dtype``), so the
    checkpoint values are rounded to it on load; the product is then taken in fp32.
    """
    first = weight_scale.to(params_dtype).to(torch.float32)
    second = weight_scale_second.to(params_dtype).to(torch.float32)
    return (first * second).transpose(-1, -2).contiguous()


def _segment_sums(values: torch.Tensor, segment: int) -> torch.Tensor:
    """Exact int16 sums of each run of ``segment`` int4 values (held in int8) along the last dim.

    The two halves of every run are first added in int8, up to four times: a sum of 16 int4 values
    lies in -128..112, still exact in int8, and these adds are faster than one int16 reduction.
    """
    runs = values.reshape(values.shape[-2], values.shape[-1] // segment, segment)
    width = segment
    for _ in range(4):
        if width % 2:
            break
        width //= 2
        runs = torch.add(runs[..., :width], runs[..., width:])
    return runs.sum(-1, dtype=torch.int16)


def scale_bias_chunks(
    values: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_second: torch.Tensor | None,
    num_chunks: int,
) -> torch.Tensor:
    """``8 * sum_k w[o,k] * s[o, k//g]``, split into ``num_chunks`` equal input chunks: f32 ``[out, chunks]``.

    ``s = weight_scale * weight_scale_second`` (or ``weight_scale`` alone, per channel). Chunks are
    what lets a tensor-parallel rank sum only its share of the input dim, as msModelSlim's
    ``[out, 16]`` scale_bias does. The integer sums are exact (on the values' device) and the
    float64 accumulation runs on the CPU in a fixed order and is rounded to fp32 once, so every
    device gives the same bits, including NPUs without float64 arithmetic.
    ``values`` must be int4 (-8..7) held in int8. Returns a tensor on the values' device.
    """
    out_features, in_features = values.shape[-2], values.shape[-1]
    if in_features % num_chunks:
        raise ValueError(f"input dim {in_features} is not divisible into {num_chunks} chunks")
    chunk = in_features // num_chunks
    if weight_scale_second is None:
        group = in_features
        second = torch.ones(out_features, 1, dtype=torch.float64)
    else:
        group = in_features // weight_scale_second.shape[-1]
        second = weight_scale_second.cpu().to(torch.float64)
    # A segment is a run of k inside one chunk and one group. At most 4096 int4 values sum to at most
    # 8 * 4096 in magnitude, so an int16 sum is exact in any order (and much faster than int64).
    segment = math.gcd(chunk, group, _MAX_INT16_SEGMENT)
    segment_sums = _segment_sums(values, segment).cpu()
    segments_per_chunk = chunk // segment
    result = torch.zeros(out_features, num_chunks, dtype=torch.float64)
    for c in range(num_chunks):
        acc = torch.zeros(out_features, dtype=torch.float64)
        for j in range(c * segments_per_chunk, (c + 1) * segments_per_chunk):
            acc = acc + segment_sums[:, j].to(torch.float64) * second[:, (j * segment) // group]
        result[:, c] = acc
    first = weight_scale.cpu().to(torch.float64).reshape(out_features, 1)
    return (8.0 * result * first).to(torch.float32).to(values.device)


def sum_scale_bias_chunks(bias: torch.Tensor) -> torch.Tensor:
    """A MoE layer's scale_bias ``[E, n, chunks]`` summed over its chunks to ``[E, n]``, with vllm-ascend's own
    expression (``transpose(1, 2).contiguous().sum(axis=1)``): another order, such as ``sum(-1)``, can round
    differently in the last bit, on the CPU and on the device alike."""
    return bias.transpose(1, 2).contiguous().sum(axis=1)
