"""vllm-ascend's current line, 0.25.1rc1 and later, as its main branch reads W4A8_DYNAMIC.

main (read at 182b75ea84) serves W4A8 MoE only, and only per-channel msModelSlim 1.0.0 weights: its
W4A8_DYNAMIC Linear scheme is removed, its MoE method raises ValueError for ``group_size > 0``, and
it reads two int4 per byte only. Its per-channel processing is 0.23's (transpose, fp32 scale bits
as int64, scale_bias summed over the rank's chunks, the int8 weight viewed as int32), so each
projection becomes the same tensors as for :mod:`.vllm_ascend_023`. (0.25.1rc1 and the 0.26 branch
still read per-group, mindie and Linear weights: ``vllm-ascend-0.23`` serves those there.)
"""

from __future__ import annotations

from .vllm_ascend_023 import VllmAscend023


class VllmAscend025(VllmAscend023):
    name = "vllm-ascend-0.25"
    summary = "vllm-ascend 0.25.1rc1 and later, as main reads it (MoE only: 1.0.0 per-channel, compressed-tensors)"
    engine_releases = ">=0.25.1rc1"
    upstream = (
        "vllm-project/vllm-ascend main (182b75ea84ff13ece27b57391331ef8935410aea) "
        "vllm_ascend/quantization/methods/w4a8.py"
    )
    source_layouts = ("v1.0.0-per-channel", "compressed-tensors")

    def refusal(self, projection):
        if not projection.is_moe:
            return "vllm-ascend main has no W4A8_DYNAMIC Linear (removed after the 0.26 branch)"
        if projection.layout.name == "mindie":
            return "vllm-ascend main reads only 1.0.0 weights (two int4 per byte), not mindie's one per byte"
        if projection.group_size:
            return "vllm-ascend main refuses per-group W4A8 MoE weights ('no longer supported')"
        return super().refusal(projection)
