"""``verify --numeric``: the CPU reference of the Ascend W4A8 operators against a float computation.

The reference (``w4a8conv.serving.reference``) runs on the output's tensors with random int8 activations; the
float computation starts from the source's int4 values and scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experts import ROLES, parse_expert
from ..formats.sources.oracle import dequantized
from .arrays import source_module
from .modules import kernel_scale
from .report import VerifyReport

_MATMUL_ROWS = 256  # weight rows the float reference dequantizes at once (a few MB)

_NUMERIC_TOKENS = 4
_NUMERIC_EXPERTS = 4  # experts routed to per MoE layer: enough to exercise w13, SwiGLU and w2
# Relative error allowed (measured on the synthetic checkpoints: matmuls up to 4e-4, layers 6e-3). A
# matmul's only inexact part is scale_bias: rounded to fp32, and for 1.0.0
# computed by msModelSlim from bf16 scales (0.4% of a term), while the kernel's scales are fp16.
_MATMUL_TOLERANCE = 5e-3
_LAYER_TOLERANCE = 5e-2


def numeric_checks(dst: Path, prefixes: list[str], src, section, rng, report: VerifyReport) -> None:
    import torch

    from ..serving import reference
    from ..serving.runtime import ProcessedCheckpoint

    ckpt = ProcessedCheckpoint(dst)
    params_dtype = section.get("params_dtype", "bfloat16")
    layers: dict[str, set[int]] = {}
    naming_of = {}
    for prefix in prefixes:
        expert = parse_expert(prefix)
        if expert is not None:
            layers.setdefault(expert.layer, set()).add(expert.expert)
            naming_of[expert.layer] = expert.naming
            continue
        values, scale, second = source_module(prefix, src)
        x, pts = _activations(rng, values.shape[1])
        expected = _float_matmul(x, pts, values, kernel_scale(prefix, scale, second, params_dtype))
        got = reference.linear(torch.from_numpy(x), torch.from_numpy(pts), ckpt.load_linear(prefix)).numpy()
        _compare(prefix, got, expected, _MATMUL_TOLERANCE, report)
    for layer, experts in sorted(layers.items()):
        chosen = sorted(experts)[:_NUMERIC_EXPERTS]
        values, kernel = {}, {}
        for e in chosen:
            for role in ROLES:
                prefix = f"{layer}.{e}.{naming_of[layer].name_of(role)}"
                v, s1, s2 = source_module(prefix, src)
                # int4 values fit int8: half the memory of the oracle's int16, for the 12 matrices held
                values[(e, role)], kernel[(e, role)] = v.astype(np.int8), kernel_scale(prefix, s1, s2, params_dtype)
                del v
        hidden = values[(chosen[0], "gate")].shape[1]
        x, pts = _activations(rng, hidden)
        top_k = min(2, len(chosen))
        slots = np.stack([rng.permutation(len(chosen))[:top_k] for _ in range(_NUMERIC_TOKENS)])
        weights = rng.uniform(0.1, 1.0, size=slots.shape)
        expected = np.zeros((_NUMERIC_TOKENS, hidden))
        for t in range(_NUMERIC_TOKENS):
            for slot, weight in zip(slots[t], weights[t], strict=True):
                e = chosen[slot]
                g = _float_matmul(x[t : t + 1], pts[t : t + 1], values[(e, "gate")], kernel[(e, "gate")])
                u = _float_matmul(x[t : t + 1], pts[t : t + 1], values[(e, "up")], kernel[(e, "up")])
                act = g / (1 + np.exp(-g)) * u
                q_scale = np.maximum(np.abs(act).max(-1), 1e-12) / 127.0
                q = np.clip(np.round(act / q_scale[:, None]), -128, 127)
                expected[t] += weight * _float_matmul(q, q_scale, values[(e, "down")], kernel[(e, "down")])[0]
        tensors = ckpt.load_moe(layer, experts=chosen)
        for slot, e in enumerate(chosen):  # each matmul alone: tight, a wrong bias or scale shows
            gate_up = (e, "gate"), (e, "up")
            w13_values = np.concatenate([values[key] for key in gate_up])
            w13_scale = np.concatenate([kernel[key] for key in gate_up])
            _check_matmul(f"{layer}.{e} w13", w13_values, w13_scale, tensors, "w13", slot, rng, report)
            down = (e, "down")
            _check_matmul(f"{layer}.{e} w2", values[down], kernel[down], tensors, "w2", slot, rng, report)
        got = reference.moe(
            torch.from_numpy(x), torch.from_numpy(pts), torch.from_numpy(slots), torch.from_numpy(weights), tensors
        ).numpy()
        # The whole layer: routing, SwiGLU and the int8 re-quantization between w13 and w2, where a
        # last-bit difference moves a value across a rounding step; hence the looser tolerance.
        _compare(f"{layer} (experts {chosen})", got, expected, _LAYER_TOLERANCE, report)
        del tensors, values, kernel  # before the next layer's are read: layers never overlap in memory


def _check_matmul(what, values, scale, tensors, fused: str, slot: int, rng, report: VerifyReport) -> None:
    """One expert's w13 or w2 alone against the float computation from the source."""
    import torch

    from ..serving import reference

    x, pts = _activations(rng, values.shape[1])
    got = reference.w4a8_matmul(
        torch.from_numpy(x),
        torch.from_numpy(pts),
        tensors[f"{fused}_weight"][slot],
        tensors[f"{fused}_weight_scale"][slot],
        tensors[f"{fused}_scale_bias"][slot],
    ).numpy()
    _compare(what, got, _float_matmul(x, pts, values, scale), _MATMUL_TOLERANCE, report)


def _activations(rng, width: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(-128, 128, size=(_NUMERIC_TOKENS, width), dtype=np.int8)
    return x, rng.uniform(0.01, 0.06, size=_NUMERIC_TOKENS)


def _float_matmul(x: np.ndarray, pts: np.ndarray, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``pts * (x @ (values * scale).T)`` in float64, ``scale`` ``[out, groups]`` per group of columns.

    A block of output rows at a time: a whole float64 weight matrix (118 MB for a DeepSeek-R1
    expert projection) is fresh memory on every call, and its page faults cost more than the matmul.
    """
    n = values.shape[0]
    x = x.astype(np.float64)
    out = np.empty((x.shape[0], n))
    for start in range(0, n, _MATMUL_ROWS):
        rows = slice(start, start + _MATMUL_ROWS)
        out[:, rows] = x @ dequantized(values[rows], scale[rows]).T
    return pts.reshape(-1, 1) * out


def _compare(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float, report: VerifyReport) -> None:
    report.numeric_checks += 1
    error = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    if not error <= tolerance:
        report.problem(f"{what}: operator reference differs from the float computation (relative error {error:.2e})")
