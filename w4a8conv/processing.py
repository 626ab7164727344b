"""Process one W4A8 projection: its source tensors in, its operator tensors out. Pure, no I/O.

Reproduces vllm-ascend 0.23's ``process_weights_after_loading`` (W4A8_FORMATS.md) for one matrix;
the serving side only stacks experts and concatenates gate/up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import BadInputError
from .packing import pack_int4_to_int32
from .plan import Projection
from .scales import linear_antiquant_scale, moe_per_channel_scale, moe_per_group_scale


def _where(projection: Projection, role: str) -> str:
    info = projection.sources[role]
    return f"{info.path}: tensor {info.name}"


def check_source_values(projection: Projection, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse what cannot be processed: non-zero offsets and non-finite scales."""
    for role in ("weight_offset", "weight_offset_second"):
        offset = tensors.get(role)
        if offset is not None and bool((offset != 0).any()):
            raise BadInputError(
                f"{_where(projection, role)}: non-zero offsets (asymmetric quantization); "
                "W4A8_DYNAMIC kernels only take symmetric int4"
            )
    for role in ("weight_scale", "weight_scale_second", "scale_bias"):
        value = tensors.get(role)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise BadInputError(f"{_where(projection, role)}: holds NaN or Inf")


def process_projection(
    projection: Projection,
    tensors: dict[str, torch.Tensor],
    params_dtype: torch.dtype = torch.bfloat16,
    pack_int4: Callable[[torch.Tensor], torch.Tensor] = pack_int4_to_int32,
) -> dict[str, torch.Tensor]:
    """Turn one projection's source tensors into its output tensors (names as ``projection.outputs()``).

    Args:
        projection: the planned projection.
        tensors: its source tensors by role (``weight``, ``weight_scale``, ...), on any device.
        params_dtype: the model dtype; vllm-ascend rounds a W4A8 Linear's scales to it on load.
        pack_int4: packs int8 int4 values ``[out, in]`` into int32 words ``[in, out/8]`` (mindie);
            the pure torch packer by default, torch_npu's operator on an NPU.

    Returns:
        ``{name: tensor}`` on the tensors' device.
    """
    check_source_values(projection, tensors)
    layout = projection.layout
    n = projection.out_features
    scale = tensors["weight_scale"].reshape(n, 1)
    second = tensors.get("weight_scale_second") if layout.per_group else None
    if not projection.is_moe and second is not None:
        # vllm-ascend 0.23 holds a Linear's scales in the model dtype (MoE scales in fp32): they are
        # rounded on load, and both the antiquant scale and the mindie bias see the rounded values.
        scale, second = scale.to(params_dtype), second.to(params_dtype)
    weight = tensors["weight"]
    prefix = projection.prefix
    out = {f"{prefix}.weight": layout.operator_words(weight, _where(projection, "weight"), pack_int4)}
    if projection.is_moe:
        encoded = moe_per_group_scale(scale, second) if second is not None else moe_per_channel_scale(scale)
        out[f"{prefix}.weight_scale"] = encoded
    else:
        assert second is not None
        out[f"{prefix}.weight_scale_second"] = linear_antiquant_scale(scale, second, params_dtype)
    out[f"{prefix}.scale_bias"] = layout.scale_bias(
        weight, scale, second, tensors.get("scale_bias"), projection.bias_chunks
    )
    return out
