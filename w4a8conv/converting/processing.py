"""Process one W4A8 projection: its source tensors in, its output tensors out. Pure, no I/O.

The source layout turns its tensors into operator words and the scale_bias term; the serving target
decides what is written from them (``targets``). Refused here: what no target can represent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import BadInputError
from ..formats.packing import pack_int4_to_int32
from ..formats.projection import Projection
from ..formats.targets import DEFAULT_TARGET, ServingTarget, get_target
from ..names import ZERO_ROLES


def check_source_values(projection: Projection, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse what cannot be processed: non-zero offsets, non-finite scales, what the layout cannot convert exactly."""
    for role in ZERO_ROLES:
        offset = tensors.get(role)
        if offset is not None and bool((offset != 0).any()):
            raise BadInputError(
                f"{projection.where(role)}: non-zero offsets (asymmetric quantization); "
                "W4A8_DYNAMIC kernels only take symmetric int4"
            )
    for role in ("weight_scale", "weight_scale_second", "scale_bias"):
        value = tensors.get(role)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise BadInputError(f"{projection.where(role)}: holds NaN or Inf")
    problem = projection.layout.value_problem(tensors)
    if problem is not None:
        raise BadInputError(f"{projection.where('weight')}: {problem}")


def process_projection(
    projection: Projection,
    tensors: dict[str, torch.Tensor],
    params_dtype: torch.dtype = torch.bfloat16,
    pack_int4: Callable[[torch.Tensor], torch.Tensor] = pack_int4_to_int32,
    target: ServingTarget | None = None,
) -> dict[str, torch.Tensor]:
    """Turn one projection's source tensors into its output tensors (names as ``target.outputs``).

    Args:
        projection: the planned projection.
        tensors: its source tensors by role (``weight``, ``weight_scale``, ...), on any device.
        params_dtype: the model dtype; vllm-ascend rounds a W4A8 Linear's scales to it on load.
        pack_int4: packs int8 int4 values ``[out, in]`` into int32 words ``[in, out/8]`` (mindie);
            the pure torch packer by default, torch_npu's operator on an NPU.
        target: the serving target (default: the newest).

    Returns:
        ``{name: tensor}`` on the tensors' device.
    """
    check_source_values(projection, tensors)
    target = target or get_target(DEFAULT_TARGET)
    return target.process(projection, tensors, params_dtype, pack_int4)
