"""The CPU reference of the W4A8 operators, fed with processed tensors, matches a float computation
from the unconverted checkpoint's int4 values and scales."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.safetensors_io import read_header
from w4a8conv.serving import reference
from w4a8conv.serving.runtime import load_linear, load_moe
from w4a8conv.synthetic import w4a8_truth
from w4a8conv.verify import VerifyReport, verify_conversion
from w4a8conv.verify.numeric import numeric_checks

from .conftest import SPEC


def activations(tokens: int, width: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (tokens, width), generator=gen, dtype=torch.int8)
    return x, torch.rand(tokens, generator=gen, dtype=torch.float64) * 0.05 + 0.01


def float_matmul(x, pts, values, scale) -> torch.Tensor:
    """pts * x @ (w * s)^T in float64, from int4 values [out, in] and scales [out, groups]."""
    groups = scale.shape[1]
    s_full = scale.to(torch.float64).repeat_interleave(values.shape[1] // groups, dim=1)
    return pts.reshape(-1, 1) * (x.to(torch.float64) @ (values.to(torch.float64) * s_full).T)


def test_split_int8_halves_rebuild_x():
    x = torch.arange(-128, 128, dtype=torch.int8)
    hi, lo = reference.split_int8(x)
    assert hi.min() >= -8 and hi.max() <= 7 and lo.min() >= -8 and lo.max() <= 7
    assert torch.equal(16 * hi + lo + 8, x.to(torch.int16))


@pytest.mark.parametrize("layout_name", ["mindie", "v1.0.0-per-group"])
@pytest.mark.parametrize("proj", ["q_b_proj", "o_proj"])
def test_linear_matches_float_computation(converted_checkpoints, layout_name, proj):
    prefix = f"model.layers.0.self_attn.{proj}"
    truth = w4a8_truth(SPEC, layout_name)[prefix]
    x, pts = activations(5, SPEC.hidden)
    got = reference.linear(x, pts, load_linear(converted_checkpoints[layout_name], prefix))
    # The kernel's scales: both rounded to the model dtype (bf16) on load, multiplied in fp32.
    kernel_scale = truth.weight_scale.bfloat16().float() * truth.weight_scale_second.bfloat16().float()
    expected = float_matmul(x, pts, truth.values, kernel_scale)
    # mindie biases come from exactly these scales; msModelSlim's from bf16 scales multiplied in
    # another order: both agree with the float result to float32 rounding of the bias.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    exact = float_matmul(x, pts, truth.values, truth.weight_scale * truth.weight_scale_second)
    assert (got - exact).norm() / exact.norm() < 1e-2  # bf16 scales: within 1%


def test_a_wrong_scale_bias_shows_in_the_output(converted_checkpoints):
    prefix = "model.layers.0.self_attn.o_proj"
    tensors = load_linear(converted_checkpoints["mindie"], prefix)
    x, pts = activations(3, SPEC.hidden)
    good = reference.linear(x, pts, tensors)
    tensors["weight_scale_bias"] = tensors["weight_scale_bias"] * 1.01
    assert not torch.allclose(reference.linear(x, pts, tensors), good, rtol=1e-4)


def float_moe(x, pts, topk_ids, topk_weights, truth, layer, per_channel) -> torch.Tensor:
    out = torch.zeros(x.shape[0], SPEC.hidden, dtype=torch.float64)

    def kernel_scale(t):
        if per_channel:
            return t.weight_scale
        return (t.weight_scale * t.weight_scale_second).half().float()  # fp16-rounded for the MoE kernel

    for i in range(x.shape[0]):
        for e, weight in zip(topk_ids[i].tolist(), topk_weights[i].tolist(), strict=True):
            gate, up, down = (truth[f"{layer}.{e}.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
            g = float_matmul(x[i : i + 1], pts[i : i + 1], gate.values, kernel_scale(gate))
            u = float_matmul(x[i : i + 1], pts[i : i + 1], up.values, kernel_scale(up))
            q, q_scale = reference.dynamic_quant(torch.nn.functional.silu(g) * u)
            out[i] += weight * float_matmul(q, q_scale, down.values, kernel_scale(down))[0]
    return out


@pytest.mark.parametrize(
    "layout_name,tolerance",
    # The only inexact input is scale_bias: from the exact scales for mindie, from bf16 scales in
    # msModelSlim's 1.0.0 output; the int8 re-quantization between w13 and w2 amplifies either.
    [("mindie", 5e-3), ("v1.0.0-per-group", 1e-2), ("v1.0.0-per-channel", 1e-2)],
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_moe_matches_float_computation(converted_checkpoints, layout_name, tolerance, seed):
    layer = f"model.layers.{SPEC.dense_layers}.mlp.experts"
    truth = w4a8_truth(SPEC, layout_name)
    tokens, top_k = 6, 2
    x, pts = activations(tokens, SPEC.hidden, seed)
    gen = torch.Generator().manual_seed(seed)
    topk_ids = torch.stack([torch.randperm(SPEC.experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    got = reference.moe(x, pts, topk_ids, topk_weights, load_moe(converted_checkpoints[layout_name], layer))
    expected = float_moe(x, pts, topk_ids, topk_weights, truth, layer, layout_name.endswith("per-channel"))
    assert (got - expected).norm() / expected.norm() < tolerance


def test_each_w4a8_matmul_matches_float_computation(converted_checkpoints, layout):
    """One matmul alone, with no re-quantization after it: agreement to the bias's precision.

    Upstream computes the mindie bias from the fp32 scales but encodes fp16-rounded ones for the
    kernel (so even stock vllm-ascend is off by 8 * sum w * (s - fp16(s)), ~3e-5 here); msModelSlim
    computes the 1.0.0 bias from bf16 scales (~1e-4 here).
    """
    layer = f"model.layers.{SPEC.dense_layers}.mlp.experts"
    truth = w4a8_truth(SPEC, layout)[f"{layer}.1.down_proj"]
    t = load_moe(converted_checkpoints[layout], layer)
    x, pts = activations(4, SPEC.intermediate)
    got = reference.w4a8_matmul(x, pts, t["w2_weight"][1], t["w2_weight_scale"][1], t["w2_scale_bias"][1])
    if layout == "compressed-tensors":  # its scales are stored in the model dtype
        scale = truth.weight_scale.to(torch.bfloat16).float()
    elif layout.endswith("per-channel"):
        scale = truth.weight_scale
    else:
        scale = (truth.weight_scale * truth.weight_scale_second).half().float()
    expected = float_matmul(x, pts, truth.values, scale)
    assert (got - expected).norm() / expected.norm() < (1e-4 if layout == "mindie" else 1e-3)


def test_verify_numeric_on_every_layout(source_checkpoints, converted_checkpoints, layout):
    report = verify_conversion(source_checkpoints[layout], converted_checkpoints[layout], numeric=True)
    assert report.ok, report.problems
    assert report.numeric_checks >= 2 * (1 + 2 * 4)  # per MoE layer: the layer and w13, w2 of 4 experts


def test_verify_numeric_catches_a_shifted_bias(source_checkpoints, converted_checkpoints, tmp_path):
    """A scale_bias whose rows are shifted keeps plausible values; the operator check sees it."""
    out = tmp_path / "out"
    shutil.copytree(converted_checkpoints["v1.0.0-per-group"], out)
    name = f"model.layers.{SPEC.dense_layers}.mlp.experts.0.down_proj.scale_bias"
    info = next(h.tensors[name] for p in out.glob("*.safetensors") if name in (h := read_header(p)).tensors)
    data = np.fromfile(info.path, dtype=np.float32, count=info.nbytes // 4, offset=info.begin).reshape(info.shape)
    with open(info.path, "r+b") as f:
        f.seek(info.begin)
        f.write(np.roll(data, 1, axis=0).tobytes())
    report = VerifyReport()
    source = open_checkpoint(source_checkpoints["v1.0.0-per-group"])
    section = {"params_dtype": "bfloat16"}
    prefixes = [f"model.layers.{SPEC.dense_layers}.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    numeric_checks(out, prefixes, source.tensors, section, np.random.default_rng(0), report)
    assert not report.ok and any("experts.0 w2" in p for p in report.problems)


def test_the_kernel_reference_unpacks_a_block_of_outputs_at_a_time(monkeypatch):
    """verify --numeric's memory: a whole expert's weights in float64 are 235 MB at DeepSeek-R1's shapes, so
    the reference unpacks at most 512 outputs at a time; the result is the same as unpacking all at once."""
    torch.manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (256, 1536 // 8), dtype=torch.int32)
    scale, bias = torch.rand(2, 1536), torch.rand(1536)
    x, pts = torch.randint(-128, 128, (3, 256), dtype=torch.int8), torch.rand(3)
    widths = []
    real = reference.unpack_int32_words
    monkeypatch.setattr(reference, "unpack_int32_words", lambda w: widths.append(w.shape[1] * 8) or real(w))
    got = reference.w4a8_matmul(x, pts, words, scale, bias)
    assert widths == [512, 512, 512]
    w = real(words).double().reshape(1536, 2, 128)
    hi, lo = (h.double().reshape(3, 2, 128) for h in reference.split_int8(x))
    integer = 16 * torch.einsum("tgk,ogk->tgo", hi, w) + torch.einsum("tgk,ogk->tgo", lo, w)
    expected = pts.double().reshape(-1, 1) * ((integer * scale.double().unsqueeze(0)).sum(1) + bias.double())
    assert torch.equal(got, expected)
