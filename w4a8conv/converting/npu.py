"""Ascend NPU support through torch_npu, imported only when an NPU is asked for.

On an NPU, unpacked (mindie) int4 weights are packed by torch_npu's own operator, the one
vllm-ascend calls at load time, rather than by the portable bit operations in ``packing``. Both
give the same words (W4A8_FORMATS.md); the tests check this with a stand-in torch_npu.
"""

from __future__ import annotations

import importlib

import torch


def npu_pack_int4_to_int32(values: torch.Tensor, for_moe: bool) -> torch.Tensor:
    """Pack int8 int4 values ``[out, in]`` into int32 words ``[in, out/8]`` with torch_npu's operators.

    As vllm-ascend does: a MoE expert through ``npu_quantize(w, [1.0], None, quint4x2, -1, False)``
    on float values, a Linear through ``npu_convert_weight_to_int4pack`` on int32 values. Both pack
    8 consecutive values of a row of the transposed ``[in, out]`` matrix, low nibble first.
    """
    torch_npu = importlib.import_module("torch_npu")
    transposed = values.transpose(-1, -2).contiguous()
    if for_moe:
        unit_scale = torch.tensor([1.0], device=values.device)
        return torch_npu.npu_quantize(transposed.to(torch.float32), unit_scale, None, torch.quint4x2, -1, False)
    return torch_npu.npu_convert_weight_to_int4pack(transposed.to(torch.int32))
