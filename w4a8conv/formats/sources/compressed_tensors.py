"""LLM-Compressor's compressed-tensors W4A8 (``int-quantized``, per-channel): one int4 per byte, model-dtype scales.

On disk per projection: ``weight`` int8 ``[out, in]`` holding -8..7 and ``weight_scale [out, 1]`` in
the model's dtype (bf16); no offsets, no scale_bias. The checkpoint has no msModelSlim description:
``config.json``'s ``quantization_config`` says what is quantized (:mod:`w4a8conv.reading.quantization_config`).

vllm-ascend main computes the bias at load, per rank over the rank's input slice, as
``8 * (w.float() * s).sum(axis=1)`` in fp32. Each term ``w * s`` is a bf16 scale times a small
integer, and every partial sum is ``s`` times an integer; while ``sum |w|`` of a row stays under
``2**(24 - p)`` (``p``: the significand bits of the scale's dtype; 16 for bf16's 8, so always for
``in < 8192``) every partial sum is exact in fp32, in any order. The bias is then one exact value, which
w4a8conv computes from integer sums, stores in 16 chunks for row-parallel projections, and which the
plugin's chunk sums (exact too) reproduce bit for bit on every tensor-parallel rank. A row past that
bound is refused: there the engine's result depends on the device's summation order.
"""

from __future__ import annotations

import numpy as np

from ...names import ROW_PARALLEL, SCALE_BIAS_CHUNKS
from .base import ModuleHeaders
from .mindie import MindieLayout, MindieOracle
from .oracle import SourceArrays

# Significand bits (with the implicit one) of the scale dtypes a compressed-tensors checkpoint holds.
_SIGNIFICAND_BITS = {"BF16": 8, "F16": 11, "F32": 24, "bfloat16": 8, "float16": 11, "float32": 24}
_FP32_SIGNIFICAND_BITS = 24
_INT4_MAGNITUDE = 8  # the largest |w| of an int4


def exact_bias_limit(scale_dtype: str) -> int:
    """``sum |w|`` of a row must stay below this for every fp32 partial sum of ``w * s`` to be exact."""
    return 1 << (_FP32_SIGNIFICAND_BITS - _SIGNIFICAND_BITS[scale_dtype])


class CompressedTensorsOracle(MindieOracle):
    scale_bias_origin = "8 * s * sum(w), exact (integer sums)"

    def expected_scale_bias(self, arrays: SourceArrays, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        values = self.int4_values(arrays.raw, arrays.out_features).astype(np.int64)
        n, k = values.shape
        sums = values.reshape(n, chunks, k // chunks).sum(-1)
        expected = 8.0 * sums * arrays.scale.astype(np.float64)[:, None]
        return expected, np.zeros_like(expected)


class CompressedTensorsLayout(MindieLayout):
    name = "compressed-tensors"
    summary = (
        "LLM-Compressor compressed-tensors W4A8 (int-quantized, channel): int8 [out, in] one int4 per "
        "byte, model-dtype per-channel scales, no scale_bias; described by config.json"
    )
    per_group = False
    synthetic_linear = False  # vllm-ascend main serves compressed-tensors W4A8 in MoE layers only
    described_by_config = True
    oracle = CompressedTensorsOracle()

    def matches(self, module: ModuleHeaders) -> bool:
        # Unpacked and per-channel like no msModelSlim layout, and without the offsets msModelSlim writes.
        return super().matches(module) and "weight_offset" not in module.sources

    def bias_chunks(self, module: ModuleHeaders, problems: list[str]) -> int | None:
        """mindie's rule, but a row-parallel input dim that does not split into the chunks is refused: main
        computes this bias per rank, which the chunks must reproduce."""
        chunks = super().bias_chunks(module, problems)  # reports a stored scale_bias
        scale = module.sources["weight_scale"]
        if scale.dtype not in _SIGNIFICAND_BITS:
            problems.append(f"{scale.path}: tensor {scale.name}: scale dtype {scale.dtype}, expected BF16, F16 or F32")
            return None
        if module.proj_name in ROW_PARALLEL and module.in_features % SCALE_BIAS_CHUNKS:
            problems.append(
                f"{module.where}: input dim {module.in_features} does not split into {SCALE_BIAS_CHUNKS} "
                "scale_bias chunks for tensor parallelism"
            )
            return None
        return chunks

    def check_description(self, description: dict, path: str, problems: list[str]) -> None:
        """The description is derived from config.json, which :mod:`w4a8conv.reading.quantization_config` checked."""

    def engine_keys(self, description: dict, group_size: int | None) -> dict:
        """What vllm-ascend's compressed-tensors config gives its W4A8 MoE method for a channel-strategy
        scheme: no msModelSlim version, its own quant method, the weight strategy."""
        return {
            "ascend_quant_method": "compressed-tensors",
            "group_size": 0,
            "version": "0",
            "weight_strategy": "channel",
        }

    def value_problem(self, tensors):
        import torch

        weight, scale = tensors["weight"], tensors["weight_scale"]
        limit = exact_bias_limit(str(scale.dtype).removeprefix("torch."))
        if _INT4_MAGNITUDE * weight.shape[-1] < limit:
            return None  # no row can reach it (DeepSeek-R1's largest input dim, 7168, cannot with bf16 scales)
        worst = int(weight.abs().sum(-1, dtype=torch.int32).max()) if weight.numel() else 0
        if worst < limit:
            return None
        return (
            f"a row's sum of |w| is {worst}, at or above {limit}: the engine's fp32 bias would round, in an "
            "order only the device knows, so no conversion can match it bit for bit"
        )

    # scale_bias: mindie's, with no per-group scales: exact integer sums times the scale in float64, which
    # (below the bound value_problem checks) is exact and so rounds to fp32 unchanged.

    def synthetic_tensors(self, prefix, values, weight_scale, weight_scale_second, row_parallel):
        import torch

        return {f"{prefix}.weight": values.clone(), f"{prefix}.weight_scale": weight_scale.to(torch.bfloat16)}

    def synthetic_w8a8(self, prefix: str, n: int, k: int, random) -> dict:
        import torch

        tensors = super().synthetic_w8a8(prefix, n, k, random)
        del tensors[f"{prefix}.weight_offset"]  # LLM-Compressor writes no offsets for symmetric schemes
        tensors[f"{prefix}.weight_scale"] = tensors[f"{prefix}.weight_scale"].to(torch.bfloat16)  # the model dtype
        return tensors

    def synthetic_description(self, group_size: int) -> dict:
        """``config.json``'s ``quantization_config``, as LLM-Compressor writes it for vllm-ascend's W4A8
        MoE recipe: routed experts W4A8, attention and the other MLPs W8A8, router and head left alone."""
        token = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}

        def group(bits: int, targets: list[str]) -> dict:
            weights = {"num_bits": bits, "type": "int", "strategy": "channel", "dynamic": False, "symmetric": True}
            return {"targets": targets, "weights": weights, "input_activations": token, "output_activations": None}

        return {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {
                "group_0": group(
                    8,
                    [
                        r"re:.*self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$",
                        r"re:.*mlp\.(shared_experts\.)?\w+_proj$",
                    ],
                ),
                "group_1": group(4, [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"]),
            },
        }
