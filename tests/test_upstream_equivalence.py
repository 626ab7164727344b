"""A converted checkpoint, loaded by w4a8conv.serving.runtime, equals what stock vllm-ascend computes at load.

Packed weights and int64 scales bit for bit; biases to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from w4a8conv.formats.sources import get_source
from w4a8conv.serving.runtime import ProcessedCheckpoint, load_linear, load_moe
from w4a8conv.synthetic import w4a8_truth

from .conftest import SPEC
from .upstream_reference import UpstreamReference

MOE_LAYERS = [f"model.layers.{i}.mlp.experts" for i in range(SPEC.dense_layers, SPEC.dense_layers + SPEC.moe_layers)]
EXACT = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")


@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 0), (2, 1)])
def test_moe_matches_upstream(source_checkpoints, converted_checkpoints, layout, tp_size, tp_rank):
    reference = UpstreamReference(source_checkpoints[layout])
    for prefix in MOE_LAYERS:
        ours = load_moe(converted_checkpoints[layout], prefix, tp_size=tp_size, tp_rank=tp_rank)
        theirs = reference.moe(prefix, SPEC.experts, tp_size=tp_size, tp_rank=tp_rank)
        assert ours.keys() == theirs.keys()
        for name in EXACT:
            assert ours[name].dtype == theirs[name].dtype, name
            assert ours[name].shape == theirs[name].shape, name
            assert torch.equal(ours[name], theirs[name]), f"{prefix} {name} differs"
        for name in ("w13_scale_bias", "w2_scale_bias"):
            assert ours[name].dtype == torch.float32 and ours[name].shape == theirs[name].shape
            if layout == "mindie":  # upstream sums fp32 terms of the rank's slice; ours float64 chunks
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
            else:  # the stored chunks, summed with upstream's expression: the same bits
                assert torch.equal(ours[name], theirs[name]), f"{prefix} {name} differs"


def test_moe_shapes_are_upstream_0_23(converted_checkpoints, layout):
    e, h, i, g = SPEC.experts, SPEC.hidden, SPEC.intermediate, SPEC.group_size
    t = load_moe(converted_checkpoints[layout], MOE_LAYERS[0])
    per_channel = not get_source(layout).per_group
    assert t["w13_weight"].shape == (e, h, 2 * i // 8) and t["w13_weight"].dtype == torch.int32
    assert t["w2_weight"].shape == (e, i, h // 8) and t["w2_weight"].dtype == torch.int32
    assert t["w13_weight_scale"].shape == ((e, 2 * i) if per_channel else (e, h // g, 2 * i))
    assert t["w2_weight_scale"].shape == ((e, 1, h) if per_channel else (e, i // g, h))
    assert t["w13_weight_scale"].dtype == t["w2_weight_scale"].dtype == torch.int64
    assert t["w13_scale_bias"].shape == (e, 2 * i) and t["w2_scale_bias"].shape == (e, h)


@pytest.mark.parametrize("layout_name", ["mindie", "v1.0.0-per-group"])
@pytest.mark.parametrize("proj", ["q_b_proj", "o_proj"])
def test_linear_matches_upstream(source_checkpoints, converted_checkpoints, layout_name, proj):
    prefix = f"model.layers.0.self_attn.{proj}"
    ours = load_linear(converted_checkpoints[layout_name], prefix)
    theirs = UpstreamReference(source_checkpoints[layout_name]).linear(prefix, torch.bfloat16)
    assert ours.keys() == theirs.keys()
    for name in ("weight", "weight_scale_second"):
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    bias_name = "weight_scale_bias" if layout_name == "mindie" else "scale_bias"
    assert ours[bias_name].shape == theirs[bias_name].shape
    torch.testing.assert_close(ours[bias_name], theirs[bias_name], rtol=1e-5, atol=1e-5)


def test_linear_bias_shapes_follow_upstream_names(converted_checkpoints):
    v1 = ProcessedCheckpoint(converted_checkpoints["v1.0.0-per-group"])
    assert v1.load_linear("model.layers.0.self_attn.q_b_proj")["scale_bias"].shape == (SPEC.hidden,)
    assert v1.load_linear("model.layers.0.self_attn.o_proj")["scale_bias"].shape == (SPEC.hidden, 16)
    mindie = ProcessedCheckpoint(converted_checkpoints["mindie"])
    assert mindie.load_linear("model.layers.0.self_attn.o_proj")["weight_scale_bias"].shape == (SPEC.hidden,)


def test_tp_shares_reassemble_the_whole_layer(converted_checkpoints):
    # Concatenating the two ranks' w13 halves (gate and up separately) gives back the tp=1 tensors,
    # and the ranks' w2 biases add up to the whole bias.
    path = converted_checkpoints["v1.0.0-per-group"]
    whole = load_moe(path, MOE_LAYERS[0])
    ranks = [load_moe(path, MOE_LAYERS[0], tp_size=2, tp_rank=r) for r in (0, 1)]
    half = SPEC.intermediate // 8 // 2
    gate = torch.cat([r["w13_weight"][..., :half] for r in ranks], -1)
    up = torch.cat([r["w13_weight"][..., half:] for r in ranks], -1)
    assert torch.equal(torch.cat([gate, up], -1), whole["w13_weight"])
    assert torch.equal(torch.cat([r["w2_weight"] for r in ranks], 1), whole["w2_weight"])
    torch.testing.assert_close(ranks[0]["w2_scale_bias"] + ranks[1]["w2_scale_bias"], whole["w2_scale_bias"])


def test_runtime_refuses_impossible_tp(converted_checkpoints):
    from w4a8conv.errors import BadInputError

    with pytest.raises(BadInputError, match="does not split"):
        load_moe(converted_checkpoints["mindie"], MOE_LAYERS[0], tp_size=16)  # I/16 = 4 is not a multiple of 8
    with pytest.raises(BadInputError, match="tp_size"):
        load_moe(converted_checkpoints["mindie"], MOE_LAYERS[0], tp_size=2, tp_rank=2)


def test_truth_is_recovered_from_processed_tensors(converted_checkpoints, layout):
    """Unpack the int32 words and decode the int64 scales: the original int4 values and scales come back."""
    from w4a8conv.formats.packing import unpack_int32_words
    from w4a8conv.formats.scales import decode_int64_to_fp32

    truth = w4a8_truth(SPEC, layout)
    ckpt = ProcessedCheckpoint(converted_checkpoints[layout])
    prefix = f"{MOE_LAYERS[1]}.2.down_proj"
    t = ckpt.tensors([f"{prefix}.weight", f"{prefix}.weight_scale"])
    assert torch.equal(unpack_int32_words(t[f"{prefix}.weight"]), truth[prefix].values)
    scale = decode_int64_to_fp32(t[f"{prefix}.weight_scale"])
    if layout == "v1.0.0-per-channel":
        assert torch.equal(scale, truth[prefix].weight_scale.T)
    elif layout == "compressed-tensors":  # LLM-Compressor stores scales in the model dtype
        assert torch.equal(scale, truth[prefix].weight_scale.to(torch.bfloat16).float().T)
    else:
        expected = (truth[prefix].weight_scale * truth[prefix].weight_scale_second).half().float().T
        assert torch.equal(scale, expected)
