"""vllm-ascend 0.23: what its W4A8_DYNAMIC ``process_weights_after_loading`` computes, per projection.

Reproduces, for one matrix, vllm-ascend 0.23's processing (W4A8_FORMATS.md); a loader only stacks
experts, concatenates gate and up, and sums a rank's scale_bias chunks. Per projection ``P``:

* ``P.weight`` int32 ``[in, out/8]``: the operator words;
* MoE ``P.weight_scale`` int64 ``[in/g, out]`` (per channel ``[1, out]``): fp32 scale bits, the
  per-group product rounded through fp16;
* Linear ``P.weight_scale_second`` float32 ``[in/g, out]``: the antiquant scale from scales rounded
  to the model dtype, as 0.23 creates a Linear's scale parameters in it;
* ``P.scale_bias`` float32 ``[out, chunks]``.

Serves every source layout, but not a W4A8 Linear with per-channel scales (0.23 has none).
"""

from __future__ import annotations

from ...errors import BadInputError
from ...names import PREPACKED_TYPE
from ...safetensors_io import OutputEntry
from .base import ServingTarget


class VllmAscend023(ServingTarget):
    name = "vllm-ascend-0.23"
    summary = "vllm-ascend 0.23 (MoE and Linear; mindie, 1.0.0 per-group and per-channel; compressed-tensors MoE)"
    quant_type = PREPACKED_TYPE
    engine = "vllm-ascend"
    # The same processing from the mid-2025 releases to the 0.26 branch (main reads a subset of it).
    engine_releases = ">=0.9.0,<0.27"
    upstream = (
        "vllm-project/vllm-ascend v0.23.0 (5cb98caaadeff42b5b62b996e34bb2aaa29d20fd) "
        "vllm_ascend/quantization/methods/w4a8.py"
    )
    source_layouts = ("mindie", "v1.0.0-per-group", "v1.0.0-per-channel", "compressed-tensors")

    def refusal(self, projection):
        if not projection.is_moe and projection.group_size == 0:
            return "a W4A8 Linear with per-channel scales is not supported by vllm-ascend"
        return super().refusal(projection)

    def outputs(self, projection):
        p, n, k = projection.prefix, projection.out_features, projection.in_features
        groups = k // projection.group_size if projection.group_size else 1
        entries = [OutputEntry(f"{p}.weight", "I32", (k, n // 8))]
        if projection.is_moe:
            entries.append(OutputEntry(f"{p}.weight_scale", "I64", (groups, n)))
        else:
            entries.append(OutputEntry(f"{p}.weight_scale_second", "F32", (groups, n)))
        entries.append(OutputEntry(f"{p}.scale_bias", "F32", (n, projection.bias_chunks)))
        return entries

    def process(self, projection, tensors, params_dtype, pack_int4):
        from ..scales import linear_antiquant_scale, moe_per_channel_scale, moe_per_group_scale

        layout = projection.layout
        scale = tensors["weight_scale"].reshape(projection.out_features, 1)
        second = tensors.get("weight_scale_second") if layout.per_group else None
        if not projection.is_moe and second is not None:
            # 0.23 holds a Linear's scales in the model dtype (MoE scales in fp32): they are rounded
            # on load, and both the antiquant scale and a computed bias see the rounded values.
            scale, second = scale.to(params_dtype), second.to(params_dtype)
        weight = tensors["weight"]
        prefix = projection.prefix
        out = {f"{prefix}.weight": layout.operator_words(weight, projection.where("weight"), pack_int4)}
        if projection.is_moe:
            encoded = moe_per_group_scale(scale, second) if second is not None else moe_per_channel_scale(scale)
            out[f"{prefix}.weight_scale"] = encoded
        else:
            out[f"{prefix}.weight_scale_second"] = linear_antiquant_scale(scale, second, params_dtype)
        out[f"{prefix}.scale_bias"] = layout.scale_bias(
            weight, scale, second, tensors.get("scale_bias"), projection.bias_chunks
        )
        _refuse_overflow(projection, out)
        return out

    def section(self):
        return {
            **super().section(),
            "scale_bias": "float32 [out, chunks]; a tensor-parallel rank sums the chunks of its input slice",
        }


def _refuse_overflow(projection, out: dict) -> None:
    """Finite source scales can still overflow: fp16 rounding of a per-group product above 65504, or a
    bias of huge terms. An operator given Inf or NaN computes garbage; refuse, naming the source."""
    import torch

    from ..scales import decode_int64_to_fp32

    for name, tensor in out.items():
        if tensor.dtype == torch.int32:
            continue  # int4 words
        values = decode_int64_to_fp32(tensor) if tensor.dtype == torch.int64 else tensor
        if not bool(torch.isfinite(values).all()):
            raise BadInputError(
                f"{projection.where('weight_scale')}: its scales make {name} overflow to Inf or NaN; "
                "no W4A8 kernel can use them"
            )
