"""Scale encodings and scale_bias: golden bit patterns and the bias formula."""

from __future__ import annotations

import struct

import pytest
import torch

from w4a8conv.formats.scales import (
    decode_int64_to_fp32,
    encode_fp32_bits_as_int64,
    linear_antiquant_scale,
    moe_per_channel_scale,
    moe_per_group_scale,
    scale_bias_chunks,
    sum_scale_bias_chunks,
)


def fp32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def test_int64_holds_fp32_bits_zero_extended():
    encoded = encode_fp32_bits_as_int64(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32))
    # 1.0 = 0x3F800000; -2.0 = 0xC0000000 (sign bit set, still zero-extended: positive int64)
    assert encoded.tolist() == [0x3F800000, 0xC0000000, 0x3F000000]
    assert decode_int64_to_fp32(encoded).tolist() == [1.0, -2.0, 0.5]


def test_decode_refuses_high_bits():
    with pytest.raises(ValueError, match="high 32 bits"):
        decode_int64_to_fp32(torch.tensor([1 << 40]))


def test_per_group_scale_rounds_through_fp16_and_transposes():
    # fp16 steps are 2^-14 in [0.0625, 0.125) and 2^-12 in [0.25, 0.5): 0.1 -> 1638 * 2^-14 =
    # 0.0999755859375, 0.3 -> 1229 * 2^-12 = 0.300048828125 (1228.8 rounds up).
    weight_scale = torch.tensor([[0.1], [2.0]])
    second = torch.tensor([[1.0, 3.0], [0.25, 1.0]])
    encoded = moe_per_group_scale(weight_scale, second)
    assert encoded.shape == (2, 2)  # [in/g, out]
    expected = [[fp32_bits(0.0999755859375), fp32_bits(0.5)], [fp32_bits(0.300048828125), fp32_bits(2.0)]]
    assert encoded.tolist() == expected


def test_per_channel_scale_keeps_fp32_bits():
    weight_scale = torch.tensor([[0.1], [3.0]])
    encoded = moe_per_channel_scale(weight_scale)
    assert encoded.shape == (1, 2)
    assert encoded.tolist() == [[fp32_bits(0.1), fp32_bits(3.0)]]  # no fp16 rounding


def test_linear_antiquant_rounds_scales_to_params_dtype():
    weight_scale = torch.tensor([[0.1]])
    second = torch.tensor([[1.0, 1.0 + 2**-10]])
    scale = linear_antiquant_scale(weight_scale, second, torch.bfloat16)
    bf16_first = torch.tensor(0.1).to(torch.bfloat16).item()  # 0.10009765625
    assert scale.dtype == torch.float32 and scale.shape == (2, 1)
    assert scale.flatten().tolist() == [bf16_first, bf16_first]  # 1 + 2^-10 rounds to 1.0 in bf16
    fp32 = linear_antiquant_scale(weight_scale, second, torch.float32)
    assert fp32.flatten().tolist() == [torch.tensor(0.1).item(), (torch.tensor(0.1) * (1 + 2**-10)).item()]


def test_scale_bias_hand_computed():
    # out=1, in=4, group 2: w = [1, -2, 3, 7], s = ws * second = 0.5 * [1, 2] -> [0.5, 0.5, 1, 1]
    values = torch.tensor([[1, -2, 3, 7]], dtype=torch.int8)
    ws = torch.tensor([[0.5]])
    second = torch.tensor([[1.0, 2.0]])
    # 8 * (1*0.5 - 2*0.5 + 3*1 + 7*1) = 8 * 9.5 = 76
    assert scale_bias_chunks(values, ws, second, 1).tolist() == [[76.0]]
    # 4 chunks of one input each: 8 * [0.5, -1, 3, 7]
    assert scale_bias_chunks(values, ws, second, 4).tolist() == [[4.0, -8.0, 24.0, 56.0]]
    # per channel: 8 * 0.5 * (1 - 2 + 3 + 7) = 36
    assert scale_bias_chunks(values, ws, None, 1).tolist() == [[36.0]]


def test_scale_bias_chunks_sum_to_whole_and_match_float64_reference():
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-8, 8, (48, 512), generator=gen, dtype=torch.int8)
    ws = torch.rand(48, 1, generator=gen) * 0.01
    second = torch.rand(48, 2, generator=gen) + 0.5  # group 256 > chunk 32: chunks split groups
    chunks = scale_bias_chunks(values, ws, second, 16)
    whole = scale_bias_chunks(values, ws, second, 1)
    s = (ws.double() * second.double()).repeat_interleave(256, dim=1)
    reference = 8 * (values.double() * s).sum(-1, keepdim=True)
    torch.testing.assert_close(whole.double(), reference, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(chunks.sum(-1, keepdim=True), whole, rtol=1e-6, atol=1e-6)


def test_scale_bias_is_independent_of_reduction_order():
    # Reversing the input dim (and the group scales with it) changes every summation order;
    # exact integer group sums plus one rounding must give the same fp32 bits.
    gen = torch.Generator().manual_seed(4)
    values = torch.randint(-8, 8, (64, 1024), generator=gen, dtype=torch.int8)
    ws = torch.rand(64, 1, generator=gen) * 0.01
    second = torch.rand(64, 4, generator=gen) + 0.5
    forward = scale_bias_chunks(values, ws, second, 1)
    # Permute inputs inside each group: group sums, and hence the result, must not change.
    perm = torch.cat([torch.randperm(256, generator=gen) + 256 * g for g in range(4)])
    permuted = scale_bias_chunks(values[:, perm], ws, second, 1)
    assert torch.equal(forward, permuted)


def test_scale_bias_exact_at_int16_limits():
    # 4096 inputs of -8 in one segment sum to -32768, the int16 minimum; per channel with 7168
    # inputs splits into segments, so 7 * 7168 does not overflow either.
    values = torch.full((8, 4096), -8, dtype=torch.int8)
    assert scale_bias_chunks(values, torch.ones(8, 1), None, 1).flatten().tolist() == [8.0 * -32768] * 8
    values = torch.full((8, 7168), 7, dtype=torch.int8)
    assert scale_bias_chunks(values, torch.ones(8, 1), None, 1).flatten().tolist() == [8.0 * 7 * 7168] * 8


@pytest.mark.parametrize("chunk", [1, 3, 24, 80, 448, 4096])
def test_scale_bias_is_exact_for_every_run_length(chunk):
    # Runs are summed by adding halves in int8 while they halve evenly (at most 4 times), then in
    # int16: odd, even and power-of-two run lengths, at the int4 extremes and at random.
    gen = torch.Generator().manual_seed(chunk)
    for values in (
        torch.full((4, 2 * chunk), -8, dtype=torch.int8),
        torch.full((4, 2 * chunk), 7, dtype=torch.int8),
        torch.randint(-8, 8, (4, 2 * chunk), generator=gen, dtype=torch.int8),
    ):
        expected = 8 * values.long().reshape(4, 2, chunk).sum(-1)
        assert torch.equal(scale_bias_chunks(values, torch.ones(4, 1), None, 2), expected.float())


def test_scale_bias_chunks_are_summed_in_upstreams_order():
    """vllm-ascend sums a MoE layer's [E, n, chunks] scale_bias as transpose(1, 2).contiguous().sum(axis=1);
    summing the last dim directly rounds differently where chunk magnitudes differ (most values here)."""
    generator = torch.Generator().manual_seed(0)
    chunks = torch.randn(4, 256, 16, generator=generator) * torch.logspace(0, -7, 16)
    upstream = chunks.transpose(1, 2).contiguous().sum(axis=1)
    assert torch.equal(sum_scale_bias_chunks(chunks), upstream)
    assert not torch.equal(chunks.sum(-1), upstream)
