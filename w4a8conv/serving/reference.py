"""CPU reference of the Ascend W4A8 operators, computed from processed tensors alone.

The kernels take int8 activations ``x`` with a per-token scale. The cube unit multiplies int4 by int4,
so ``x`` is split into two int4 halves, ``hi = x >> 4`` and ``lo = (x & 0xF) - 8``, with
``x = 16 * hi + lo + 8``; per group it computes ``16 * (hi . w) + (lo . w)``, dequantizes with the
group scale, and adds ``scale_bias = 8 * sum_k w * s`` for the missing ``8 . w`` (W4A8_FORMATS.md).
This module follows that route, so a wrong scale_bias shows up as a wrong output:

    y[t, o] = pertoken_scale[t] * (sum_g s[g, o] * (16 * hi . w + lo . w)[t, g, o] + scale_bias[o])

which equals ``pertoken_scale[t] * sum_k x[t, k] * w[o, k] * s[o, k // g]``. Everything is float64.
"""

from __future__ import annotations

import torch

from ..formats.packing import unpack_int32_words
from ..formats.scales import decode_int64_to_fp32


def split_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations into the kernel's int4 halves: ``x = 16 * hi + lo + 8``."""
    x = x.to(torch.int16)
    hi = x >> 4
    lo = (x & 0xF) - 8
    return hi, lo


def w4a8_matmul(
    x: torch.Tensor, pertoken_scale: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, scale_bias: torch.Tensor
) -> torch.Tensor:
    """One W4A8 matmul as the kernel computes it.

    Args:
        x: int8 activations ``[T, in]``.
        pertoken_scale: float ``[T]``.
        words: packed int4 weight, int32 ``[in, out/8]``.
        scale: per-group scale ``[in/g, out]`` (float, or int64 fp32 bits as the MoE kernels take it),
            or per-channel ``[1, out]`` / ``[out]``.
        scale_bias: float ``[out]``.

    Returns:
        float64 ``[T, out]``.
    """
    if scale.dtype == torch.int64:
        scale = decode_int64_to_fp32(scale)
    in_features, out_features = words.shape[0], words.shape[1] * 8
    s = scale.reshape(-1, out_features).to(torch.float64)  # [groups, out]
    groups = s.shape[0]
    hi, lo = (h.to(torch.float64).reshape(x.shape[0], groups, in_features // groups) for h in split_int8(x))
    bias = scale_bias.to(torch.float64).reshape(1, out_features)
    acc = torch.empty(x.shape[0], out_features, dtype=torch.float64)
    # A block of outputs at a time: a whole expert's weights in float64 would be 235 MB (DeepSeek-R1's w13),
    # and every output depends on its own column of words only.
    for start in range(0, out_features, _OUTPUTS_PER_BLOCK):
        cols = slice(start, min(start + _OUTPUTS_PER_BLOCK, out_features))
        w = unpack_int32_words(words[:, cols.start // 8 : cols.stop // 8].contiguous()).to(torch.float64)
        w_g = w.reshape(w.shape[0], groups, in_features // groups)  # [block, groups, in/groups]
        integer = 16 * torch.einsum("tgk,ogk->tgo", hi, w_g) + torch.einsum("tgk,ogk->tgo", lo, w_g)
        acc[:, cols] = (integer * s[:, cols].unsqueeze(0)).sum(1) + bias[:, cols]
    return pertoken_scale.to(torch.float64).reshape(-1, 1) * acc


_OUTPUTS_PER_BLOCK = 512  # 29 MB of float64 weights at DeepSeek-R1's hidden 7168


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization, as ``npu_dynamic_quant``: ``x ~ q * scale``."""
    scale = x.abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, scale


def linear(x: torch.Tensor, pertoken_scale: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A W4A8 Linear from :func:`w4a8conv.serving.runtime.load_linear` tensors: float64 ``[T, out]``."""
    bias = tensors.get("weight_scale_bias", tensors.get("scale_bias"))
    if bias is not None and bias.dim() == 2:
        bias = bias.sum(-1)
    return w4a8_matmul(x, pertoken_scale, tensors["weight"], tensors["weight_scale_second"], bias)


def moe(
    x: torch.Tensor,
    pertoken_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    tensors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """A W4A8 MoE layer from :func:`w4a8conv.serving.runtime.load_moe` tensors (one rank, expert parallel).

    Each token goes through its top-k experts: w13, SwiGLU (``silu(gate) * up``, gate first), dynamic
    int8 quantization of the result, w2; the expert outputs are summed with the routing weights.

    Returns:
        float64 ``[T, H]``.
    """
    w13, w2 = tensors["w13_weight"], tensors["w2_weight"]
    s13, s2 = tensors["w13_weight_scale"], tensors["w2_weight_scale"]
    if s13.dim() == 2:  # per-channel [E, 2I]
        s13 = s13.unsqueeze(1)
    b13, b2 = tensors["w13_scale_bias"], tensors["w2_scale_bias"]
    tokens, hidden = x.shape[0], w2.shape[-1] * 8
    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for e, weight in zip(topk_ids[t].tolist(), topk_weights[t].tolist(), strict=True):
            h = w4a8_matmul(x[t : t + 1], pertoken_scale[t : t + 1], w13[e], s13[e], b13[e])
            gate, up = h.chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            q, q_scale = dynamic_quant(act)
            out[t] += weight * w4a8_matmul(q, q_scale, w2[e], s2[e], b2[e])[0]
    return out
