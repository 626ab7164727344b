"""An independent emulation of vllm-ascend 0.23's load-time processing, for comparing against.

It follows ``vllm_ascend/quantization/methods/w4a8.py`` step by step (load into parameters of the
upstream dtypes and shapes, transpose, encode with numpy, pack), on the unconverted checkpoint.
The two torch_npu packing operators are emulated here bit by bit, in a way unrelated to
``w4a8conv.formats.packing``, so agreement between the two is evidence, not a tautology.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import safe_open

from w4a8conv.reading.checkpoint import open_checkpoint


def emulate_int4pack(values: torch.Tensor) -> torch.Tensor:
    """``npu_convert_weight_to_int4pack`` / ``npu_quantize(..., quint4x2, -1)`` on ``[..., k, n]``."""
    v = values.to(torch.int64).numpy()
    *lead, k, n = v.shape
    assert n % 8 == 0
    groups = v.reshape(*lead, k, n // 8, 8)
    word = np.zeros((*lead, k, n // 8), dtype=np.int64)
    for j in range(8):
        word |= (groups[..., j] & 0xF) << (4 * j)
    word = np.where(word >= 2**31, word - 2**32, word).astype(np.int32)
    return torch.from_numpy(word)


def _load_all(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    out = {}
    for shard in ckpt.shards.values():
        with safe_open(str(shard.path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[name] = f.get_tensor(name)
    return out


class UpstreamReference:
    """The tensors a stock vllm-ascend 0.23 holds after ``process_weights_after_loading``."""

    def __init__(self, path):
        self.path = path
        ckpt = open_checkpoint(path)
        self.description = ckpt.description
        # main's LLM-Compressor path (ascend_quant_method == compressed-tensors), else msModelSlim's
        self.compressed_tensors = ckpt.served_config is not None
        self.tensors = _load_all(path)
        self.new_quant_version = self.description.get("version", "0") == "1.0.0"
        self.group_size = self.description.get("group_size", 256)
        self.per_channel = self.group_size == 0

    # --- MoE: AscendW4A8DynamicFusedMoEMethod, msModelSlim path -------------------------------
    def moe(
        self,
        prefix: str,
        num_experts: int,
        tp_size: int = 1,
        tp_rank: int = 0,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> dict[str, torch.Tensor]:
        """``names``: the checkpoint's gate, up and down projections (the model's loader maps them to w1, w3, w2)."""
        t = self.tensors
        gate, up, down = names

        def rows(x: torch.Tensor, dim: int) -> torch.Tensor:
            """What vLLM's weight loader gives this rank: a 1/tp share along ``dim``."""
            share = x.shape[dim] // tp_size
            return x.narrow(dim, tp_rank * share, share)

        def expert(e, proj, role):
            return t[f"{prefix}.{e}.{proj}.{role}"]

        experts = range(num_experts)
        # w13 = [gate; up] on the output dim (each split over tp), w2 split on its input dim.
        w13 = torch.stack([torch.cat([rows(expert(e, p, "weight"), 0) for p in (gate, up)]) for e in experts])
        w2 = torch.stack([rows(expert(e, down, "weight"), 1) for e in experts])
        f32 = torch.float32
        w13_scale = torch.stack(
            [torch.cat([rows(expert(e, p, "weight_scale"), 0) for p in (gate, up)]) for e in experts]
        ).to(f32)
        w2_scale = torch.stack([expert(e, down, "weight_scale") for e in experts]).to(f32)
        w13_second = w2_second = None
        if not self.per_channel:
            w13_second = torch.stack(
                [torch.cat([rows(expert(e, p, "weight_scale_second"), 0) for p in (gate, up)]) for e in experts]
            ).to(f32)
            w2_second = torch.stack([rows(expert(e, down, "weight_scale_second"), 1) for e in experts]).to(f32)
        if self.compressed_tensors:  # bf16 scales, loaded into bf16 parameters as they are
            w13_scale = torch.stack(
                [torch.cat([rows(expert(e, p, "weight_scale"), 0) for p in (gate, up)]) for e in experts]
            )
            w2_scale = torch.stack([expert(e, down, "weight_scale") for e in experts])
            return self._moe_compressed_tensors(w13, w2, w13_scale, w2_scale)
        if self.new_quant_version:
            w13_bias = torch.stack(
                [torch.cat([rows(expert(e, p, "scale_bias"), 0) for p in (gate, up)]) for e in experts]
            )
            w2_bias = torch.stack([rows(expert(e, down, "scale_bias"), 1) for e in experts])

        # process_weights_after_loading_modelslim
        w13 = w13.transpose(1, 2).contiguous()
        w2 = w2.transpose(1, 2).contiguous()
        w13_scale, w13_b = self._process_scale(w13, w13_scale, w13_second)
        w2_scale, w2_b = self._process_scale(w2, w2_scale, w2_second)
        if self.new_quant_version:
            w13_b = w13_bias.transpose(1, 2).contiguous().sum(axis=1)
            w2_b = w2_bias.transpose(1, 2).contiguous().sum(axis=1)
        if self.per_channel and w13_scale.dim() > 1 and w13_scale.shape[1] == 1:
            w13_scale = w13_scale.squeeze(1)
        return {
            "w13_weight": self._pack(w13),
            "w2_weight": self._pack(w2),
            "w13_weight_scale": w13_scale,
            "w2_weight_scale": w2_scale,
            "w13_scale_bias": w13_b,
            "w2_scale_bias": w2_b,
        }

    def _moe_compressed_tensors(self, w13, w2, w13_scale, w2_scale) -> dict[str, torch.Tensor]:
        """process_weights_after_loading_compressed_tensors on main (182b75ea84), step by step."""
        w13 = w13.transpose(1, 2).contiguous()
        w2 = w2.transpose(1, 2).contiguous()

        def bias(weight, scale):
            group_num, _, n = weight.shape
            scale = scale.transpose(1, 2).contiguous().reshape(group_num, -1, n)
            return 8 * (weight.to(torch.float32) * scale).sum(axis=1)

        def encode(scale):
            scale_np = scale.to(torch.float32).transpose(1, 2).contiguous().numpy().copy()
            scale_np.dtype = np.uint32
            return torch.from_numpy(scale_np.astype(np.int64))

        def pack_pairs(weight):  # _pack_int4_to_int8, then _pack_to_int32's view
            shape = weight.shape
            pairs = weight.reshape(-1, 2)
            packed = torch.bitwise_or(torch.bitwise_left_shift(pairs[:, 1:], 4), pairs[:, :1] & 0b00001111)
            return packed.reshape((*shape[:-1], shape[-1] // 2)).clone().view(torch.int32).contiguous()

        w13_scale_encoded = encode(w13_scale)
        return {
            "w13_weight": pack_pairs(w13),
            "w2_weight": pack_pairs(w2),
            "w13_weight_scale": w13_scale_encoded.squeeze(1),
            "w2_weight_scale": encode(w2_scale),
            "w13_scale_bias": bias(w13, w13_scale),
            "w2_scale_bias": bias(w2, w2_scale),
        }

    def _process_scale(self, weight, scale, per_group_scale):
        scale = scale.transpose(1, 2).contiguous()
        if self.per_channel:
            scale_np = scale.numpy().copy()
            scale_np.dtype = np.uint32
            return torch.from_numpy(scale_np.astype(np.int64)), None
        per_group_scale = per_group_scale.transpose(1, 2).contiguous()
        group_num, k, n = weight.shape
        if self.new_quant_version:
            n = n * 2
        per_group_scale = per_group_scale.reshape(group_num, -1, n)
        group_num, quantgroup_num, n = per_group_scale.shape
        bias = None
        if not self.new_quant_version:
            weight_high = weight.to(torch.float32).reshape(
                [group_num, quantgroup_num, -1, n]
            ) * per_group_scale.reshape([group_num, quantgroup_num, 1, n])
            weight_high = weight_high.reshape([group_num, k, n])
            bias = 8 * (weight_high.to(torch.float32) * scale).sum(axis=1)
        scale_fp32 = (scale * per_group_scale).to(torch.float16).to(torch.float32)
        scale_fp32_np = scale_fp32.numpy().copy()
        scale_fp32_np.dtype = np.uint32
        sscale = np.zeros((group_num, quantgroup_num, n * 2), dtype=np.uint32)
        sscale[..., ::2] = scale_fp32_np
        buffer = np.frombuffer(sscale.tobytes(), dtype=np.int64).copy()
        return torch.from_numpy(buffer).reshape(group_num, quantgroup_num, n), bias

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        if self.new_quant_version:
            return weight.view(torch.int32).contiguous()
        return emulate_int4pack(weight)

    # --- Linear: AscendW4A8DynamicLinearMethod -------------------------------------------------
    def linear(self, prefix: str, params_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        t = self.tensors
        weight = t[f"{prefix}.weight"].clone()
        # Parameters are created in params_dtype; loading copies (and rounds) the checkpoint into them.
        weight_scale = t[f"{prefix}.weight_scale"].to(params_dtype)
        weight_scale_second = t[f"{prefix}.weight_scale_second"].to(params_dtype)
        weight = weight.transpose(0, 1).contiguous()
        weight_scale = weight_scale.flatten().to(torch.float32)
        per_group_scale = weight_scale_second.transpose(0, 1).contiguous()
        k, n = weight.shape
        group_num, _ = per_group_scale.shape
        if self.new_quant_version:
            n = n * 2
        out = {}
        if not self.new_quant_version:
            weight_high = weight.to(torch.float32).reshape(group_num, -1, n) * per_group_scale.reshape(group_num, 1, n)
            weight_high = weight_high.reshape(k, n)
            out["weight_scale_bias"] = 8 * (weight_high.to(torch.float32) * weight_scale).sum(dim=0)
        else:
            scale_bias = t[f"{prefix}.scale_bias"]
            out["scale_bias"] = scale_bias.flatten() if scale_bias.shape[1] == 1 else scale_bias.contiguous()
        out["weight_scale_second"] = (weight_scale * per_group_scale).reshape(group_num, n)
        if self.new_quant_version:
            out["weight"] = weight.view(torch.int32).contiguous()
        else:
            out["weight"] = emulate_int4pack(weight.to(torch.int32))
        return out
