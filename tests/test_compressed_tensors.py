"""The compressed-tensors source: described by config.json, converted bit-exactly, refused where it cannot be."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from w4a8conv.formats.sources import get_source
from w4a8conv.names import DESCRIPTION_FILE
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.safetensors_io import read_header
from w4a8conv.verify import verify_conversion

from .conftest import cli

LAYOUT = "compressed-tensors"


def test_the_config_gives_every_tensor_its_type(source_checkpoints):
    types = open_checkpoint(source_checkpoints[LAYOUT]).description
    assert types["model.layers.1.mlp.experts.3.down_proj.weight"] == "W4A8_DYNAMIC"
    assert types["model.layers.1.mlp.experts.3.down_proj.weight_scale"] == "W4A8_DYNAMIC"
    assert types["model.layers.1.mlp.shared_experts.up_proj.weight"] == "W8A8_DYNAMIC"
    assert types["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale"] == "W8A8_DYNAMIC"
    assert types["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"  # a dense MLP: W8A8 group
    for name in ("model.layers.1.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert types[name] == "FLOAT", name
    assert types["group_size"] == 0 and types["model_quant_type"] == "W4A8_DYNAMIC"


def _with_config(tmp_path, source_checkpoints, change) -> str:
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints[LAYOUT], src)
    config = json.loads((src / "config.json").read_text())
    change(config["quantization_config"])
    (src / "config.json").write_text(json.dumps(config))
    return src


def _group(name: str, part: str, **values):
    return lambda q: q["config_groups"][name][part].update(values)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _group("group_1", "weights", strategy="group", group_size=128),
            "config_groups.group_1: weights 4-bit int group",
        ),
        (_group("group_1", "weights", symmetric=False), "config_groups.group_1: weights 4-bit int channel asymmetric"),
        (_group("group_0", "input_activations", dynamic=False, strategy="tensor"), "activations 8-bit tensor static"),
        (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized'; w4a8conv reads int-quantized only"),
        (lambda q: q.pop("config_groups"), "quantization_config has no config_groups"),
        (lambda q: q.update(ignore="lm_head"), "quantization_config.ignore is not a list of names"),
        (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config format"),
        (lambda q: q.update(ignore=["re:(unclosed"]), "'re:(unclosed' is not a regular expression"),
        (lambda q: q["config_groups"]["group_0"].update(targets="Linear"), "group_0: targets is not a list of names"),
    ],
)
def test_a_scheme_it_cannot_convert_is_refused_in_one_line_naming_the_config(
    tmp_path, source_checkpoints, change, message
):
    src = _with_config(tmp_path, source_checkpoints, change)
    for command in (("inspect", src), ("convert", "--in", src, "--out", tmp_path / "out")):
        code, _, stderr = cli(*command)
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: {src / 'config.json'}: ") and message in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0, 1])
def test_a_w4a8_zero_point_of_zeros_is_consumed_and_any_other_refused(tmp_path, source_checkpoints, value):
    """Older compressed-tensors saved symmetric zero points (zeros); main creates no parameter for them."""
    from safetensors.torch import load_file, save_file

    src = _with_config(tmp_path, source_checkpoints, lambda q: None)
    checkpoint = open_checkpoint(src)
    scale = next(n for n, t in checkpoint.description.items() if t == "W4A8_DYNAMIC" and n.endswith(".weight_scale"))
    shard = checkpoint.tensors[scale].path
    tensors = load_file(shard)
    zero_point = scale.replace("weight_scale", "weight_zero_point")
    tensors[zero_point] = torch.full(tensors[scale].shape, value, dtype=torch.int8)
    save_file(tensors, shard)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][zero_point] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out")
    if value:
        assert code == 2 and f"tensor {zero_point}: non-zero offsets (asymmetric quantization)" in stderr
        return
    assert code == 0, stderr
    described = json.loads((tmp_path / "out" / DESCRIPTION_FILE).read_text())
    assert zero_point not in described and verify_conversion(src, tmp_path / "out").ok


def test_compressed_tensors_weights_with_an_msmodelslim_description_are_refused(tmp_path, source_checkpoints):
    """Which config the serving engine reads decides the processing: a checkpoint with both is ambiguous."""
    src = _with_config(tmp_path, source_checkpoints, lambda q: None)
    (src / DESCRIPTION_FILE).write_text(json.dumps(open_checkpoint(src).description))
    code, stdout, _ = cli("inspect", src)
    assert code == 2
    assert "compressed-tensors weights in a checkpoint described by quant_model_description.json" in stdout


def test_a_row_whose_bias_the_engine_would_round_is_refused():
    """Below 2**16 of sum |w| every fp32 partial sum of bf16 * int4 is exact in any order; at it, not."""
    layout = get_source(LAYOUT)
    scale = torch.full((2, 1), 0.01, dtype=torch.bfloat16)
    fits = torch.full((2, 8192), -8, dtype=torch.int8)
    fits[:, 0] = -7  # sum |w| = 65535
    assert layout.value_problem({"weight": fits, "weight_scale": scale}) is None
    over = torch.full((2, 8192), -8, dtype=torch.int8)  # 65536
    problem = layout.value_problem({"weight": over, "weight_scale": scale})
    assert problem.startswith("a row's sum of |w| is 65536, at or above 65536")
    assert layout.value_problem({"weight": over[:, :7168], "weight_scale": scale}) is None  # 8 * 7168 < 2**16
    # fp16 scales have 11 significand bits: the bound is 2**13
    assert layout.value_problem({"weight": over[:, :1024], "weight_scale": scale.half()}) is not None


def test_the_bias_is_the_exact_integer_sum_times_the_scale(converted_checkpoints, source_checkpoints):
    """8 * s * sum(w) per chunk, with no rounding at all, for w13 (one chunk) and w2 (16 chunks)."""
    from w4a8conv.safetensors_io import read_tensor
    from w4a8conv.serving.runtime import ProcessedCheckpoint

    src = open_checkpoint(source_checkpoints[LAYOUT])
    out = ProcessedCheckpoint(converted_checkpoints[LAYOUT])
    for prefix in ("model.layers.1.mlp.experts.2.down_proj", "model.layers.2.mlp.experts.0.gate_proj"):
        weight = read_tensor(src.tensors[f"{prefix}.weight"]).numpy()
        scale = read_tensor(src.tensors[f"{prefix}.weight_scale"]).float().numpy().astype(np.float64)  # bf16: exact
        stored = out.tensors([f"{prefix}.scale_bias"])[f"{prefix}.scale_bias"].numpy()
        chunks = stored.shape[1]
        sums = weight.astype(np.int64).reshape(weight.shape[0], chunks, -1).sum(-1)
        assert chunks == (16 if prefix.endswith("down_proj") else 1)
        assert np.array_equal(stored.astype(np.float64), 8 * sums * scale)


def test_verify_catches_one_ulp_in_a_bias(tmp_path, source_checkpoints, converted_checkpoints):
    out = tmp_path / "out"
    shutil.copytree(converted_checkpoints[LAYOUT], out)
    (out / "w4a8conv.sha256").unlink()  # no manifest: only the recomputation can see it
    name = "model.layers.1.mlp.experts.1.down_proj.scale_bias"
    info = next(h.tensors[name] for p in out.glob("*.safetensors") if name in (h := read_header(p)).tensors)
    with open(info.path, "r+b") as f:
        f.seek(info.begin)
        value = np.frombuffer(f.read(4), dtype=np.float32)
        f.seek(info.begin)
        f.write(np.nextafter(value, np.float32(np.inf)).tobytes())
    report = verify_conversion(source_checkpoints[LAYOUT], out)
    assert not report.ok and any(name in p for p in report.problems), report.problems


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_the_bias_equals_mains_fp32_sum_on_every_rank_for_scales_of_any_magnitude(tp):
    """main sums 8 * w * s over each rank's input slice in fp32; ours is stored in 16 chunks and the rank's
    chunks are summed with upstream's expression. Scales from 1e-30 to 1e30: the same bits everywhere."""
    from w4a8conv.formats.scales import sum_scale_bias_chunks

    gen = torch.Generator().manual_seed(tp)
    out_features, in_features = 64, 7168
    weight = torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = (10.0 ** (torch.rand(out_features, 1, generator=gen) * 60 - 30)).to(torch.bfloat16)
    chunks = get_source(LAYOUT).scale_bias(weight, scale, None, None, 16)  # [out, 16], as converted
    share = in_features // tp
    for rank in range(tp):
        mine = chunks[:, rank * 16 // tp : (rank + 1) * 16 // tp]
        ours = sum_scale_bias_chunks(mine.unsqueeze(0))[0]
        rows = weight[:, rank * share : (rank + 1) * share].T.unsqueeze(0)  # main: [E, K, N]
        theirs = 8 * (rows.to(torch.float32) * scale.T.unsqueeze(0)).sum(axis=1)[0]
        assert torch.equal(ours, theirs), (tp, rank)
