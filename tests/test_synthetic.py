"""`synthetic` writes what msModelSlim (and LLM-Compressor) write, at any size."""

from __future__ import annotations

import json
import os

import pytest
import torch

from w4a8conv.safetensors_io import read_header
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from .conftest import cli


def test_the_1_0_0_layouts_look_like_msmodelslim_cli_output(source_checkpoints):
    src = source_checkpoints["v1.0.0-per-channel"]
    names = sorted(p.name for p in src.iterdir())
    assert "quant_model_weights.safetensors.index.json" in names and "DeepSeek-V3_best_practice.yaml" in names
    assert [n for n in names if n.endswith(".safetensors")] == [
        f"quant_model_weights-0000{k}-of-00004.safetensors" for k in range(1, 5)
    ]
    assert set(read_header(src / "optional" / "quarot.safetensors").tensors) == {"global_rotation"}
    description = json.loads((src / "quant_model_description.json").read_text())
    # tensors first, then the saver's keys; W4A8_DYNAMIC is never the model's type
    assert list(description)[-5:] == ["version", "model_quant_type", "metadata", "group_size", "optional"]
    assert description["model_quant_type"] == "W8A8_DYNAMIC" and description["metadata"] == {}
    assert description["optional"] == {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    attention = "model.layers.0.self_attn"
    for suffix in ("weight", "quant_bias", "input_scale", "input_offset", "deq_scale"):
        assert description[f"{attention}.q_a_proj.{suffix}"] == "W8A8"  # MLA, W8A8 static
    assert description[f"{attention}.kv_b_proj.weight"] == "FLOAT"
    tensors = {n: i for p in src.glob("*-of-*.safetensors") for n, i in read_header(p).tensors.items()}
    assert tensors[f"{attention}.q_a_proj.deq_scale"].dtype == "F32"  # kept in fp32 for a bf16 model
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "BF16"
    mtp = "model.layers.3.mlp.experts.0.down_proj"  # the MTP layer: named like W4A8 experts, W8A8 inside
    assert description[f"{mtp}.weight"] == "W8A8_DYNAMIC" and tensors[f"{mtp}.weight"].shape == (128, 64)
    config = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 1


def test_mindie_is_named_as_the_old_api_names_it(source_checkpoints):
    names = sorted(p.name for p in source_checkpoints["mindie"].glob("*.safetensors*"))
    assert names[-1] == "quant_model_weight_w4a8_dynamic.safetensors.index.json"


def test_size_options_and_a_target_size(tmp_path):
    args = ("--layout", "v1.0.0-per-channel", "--hidden", "256", "--intermediate", "128", "--experts", "8")
    code, stdout, _ = cli("synthetic", tmp_path / "a", *args, "--size-gb", "0.02", "--json")
    report = json.loads(stdout)
    assert code == 0 and 0.015e9 < report["input_bytes"] < 0.025e9 and report["moe_layers"] > 2
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]) == (256, 128, 8)
    code, _, stderr = cli("synthetic", tmp_path / "b", "--hidden", "100")
    assert code == 2 and "--hidden 100: needs a positive multiple of 16" in stderr


def test_the_legacy_style_is_what_synthetic_wrote_before(tmp_path):
    """The golden test's inputs: kept byte for byte (tests/test_golden.py checks the digests)."""
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-group", SyntheticSpec(shards=3, style="legacy"))
    names = sorted(p.name for p in src.iterdir())
    assert "optional" not in names and "quant_model_weight_w8a8_dynamic.safetensors.index.json" in names


def test_per_group_with_one_group_per_row_converts(tmp_path):
    """msModelSlim writes per-group weights whose group is a whole row (weight_scale_second [out, 1])."""
    from w4a8conv.converting.convert import convert_checkpoint
    from w4a8conv.verify import verify_conversion

    from .conftest import LEGACY_TARGET

    spec = SyntheticSpec(hidden=128, intermediate=128, group_size=128, moe_layers=1, experts=2)
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-group", spec)
    tensors = {n: i for p in src.glob("*-of-*.safetensors") for n, i in read_header(p).tensors.items()}
    shapes = {i.shape for n, i in tensors.items() if n.endswith(".weight_scale_second")}
    assert shapes == {(128, 1)}
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir
    assert verify_conversion(src, out, numeric=True).ok


def test_one_shard_of_mindie_is_the_old_api_save_and_converts(tmp_path):
    code, _, stderr = cli("synthetic", tmp_path / "src", "--layout", "mindie", "--shards", "1")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == [
        "quant_model_description_w4a8_dynamic.json",
        "quant_model_weight_w4a8_dynamic.safetensors",
    ]
    code, _, stderr = cli("convert", "--in", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 0, stderr
    assert cli("verify", tmp_path / "src", tmp_path / "out")[0] == 0


def test_synthetic_time_is_linear_in_its_size(tmp_path):
    """Default shapes make tens of thousands of tiny tensors per shard: 0.02 GB took 109 s when each
    tensor summed every pending one and re-read its shard's header (quadratic); now about 2 s."""
    import time

    started = time.monotonic()
    code, _, stderr = cli("synthetic", tmp_path / "s", "--size-gb", "0.02", "-q")
    assert code == 0, stderr
    assert time.monotonic() - started < 30


def test_size_gb_alone_is_deepseek_shaped_and_explicit_options_win(tmp_path, monkeypatch):
    from w4a8conv import synthetic

    chosen = []
    monkeypatch.setattr(synthetic, "moe_layers_for", lambda spec, layout, nbytes: spec)
    monkeypatch.setattr(synthetic, "write_checkpoint", lambda path, layout, spec, progress=None: chosen.append(spec))
    monkeypatch.setattr("w4a8conv.reading.checkpoint.open_checkpoint", lambda path: type("C", (), {"total_bytes": 0})())
    assert cli("synthetic", tmp_path / "a", "--size-gb", "2", "--layout", "v1.0.0-per-group")[0] == 0
    assert cli("synthetic", tmp_path / "b", "--size-gb", "64", "--hidden", "256")[0] == 0
    first, second = chosen
    assert (first.hidden, first.intermediate, first.group_size, first.experts) == (7168, 2048, 256, 16)
    assert (second.hidden, second.experts) == (256, 256)
    assert first.mtp_layers == 0 and not first.quarot


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--size-gb", "1", "--moe-layers", "3"), "--moe-layers with --size-gb: --size-gb chooses the number"),
        (("--experts", "0"), "--experts 0: must be positive"),
        (("--shards", "-1"), "--shards -1: must be positive"),
        (("--size-gb", "0"), "--size-gb 0.0: must be positive"),
    ],
)
def test_synthetic_errors_name_the_option(tmp_path, args, message):
    code, _, stderr = cli("synthetic", tmp_path / "s", *args)
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_an_interrupted_synthetic_run_leaves_nothing_a_rerun_trips_on(tmp_path, monkeypatch):
    """Written beside the target and renamed at the end; files get the usual mode, as convert's."""
    from w4a8conv import synthetic

    real = synthetic.block_groups

    def interrupted(spec, layout, layer=None, shape_only=False):
        if layer == 1 and not shape_only:  # while writing the second layer: shards are open
            raise KeyboardInterrupt
        return real(spec, layout, layer, shape_only)

    monkeypatch.setattr(synthetic, "block_groups", interrupted)
    code, _, stderr = cli("synthetic", tmp_path / "s")
    assert code == 130 and not (tmp_path / "s").exists()
    monkeypatch.undo()
    code, _, stderr = cli("synthetic", tmp_path / "s")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "s").rglob("*") if p.is_file()} == {oct(0o666 & ~mask)}


def test_fast_random_values_are_in_range_and_reproducible():
    from w4a8conv.synthetic.random_values import FastRandom

    values = FastRandom(3).int4(256, 512)
    assert values.dtype == torch.int8 and int(values.min()) == -8 and int(values.max()) == 7
    counts = torch.bincount((values.flatten().long() + 8), minlength=16)
    assert counts.min() > 0.9 * values.numel() / 16  # uniform over the 16 values
    assert torch.equal(FastRandom(3).int4(256, 512), values) and not torch.equal(FastRandom(4).int4(256, 512), values)
    weights = FastRandom(3).bf16(1000).float()
    assert torch.isfinite(weights).all() and float(weights.abs().min()) >= 2**-7 and float(weights.abs().max()) < 2**-3
    assert (weights < 0).any() and (weights > 0).any()


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    spec = SyntheticSpec(hidden=256, intermediate=128, experts=4, group_size=64, seed=5)
    a = write_checkpoint(tmp_path / "a", "v1.0.0-per-group", spec)
    b = write_checkpoint(tmp_path / "b", "v1.0.0-per-group", spec)
    c = write_checkpoint(tmp_path / "c", "v1.0.0-per-group", SyntheticSpec(**{**spec.__dict__, "seed": 6}))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    shards = [f for f in files if f.suffix == ".safetensors" and "-of-" in f.name]
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in shards)


def test_a_layer_is_generated_a_projection_at_a_time():
    """Memory stays at about one projection: a layer of 256 DeepSeek experts is 11 GB in mindie."""
    from w4a8conv.synthetic import block_groups

    spec = SyntheticSpec(hidden=7168, intermediate=2048, experts=256, group_size=256, mtp_layers=0, quarot=False)
    groups = list(block_groups(spec, "mindie", spec.dense_layers, shape_only=True))
    largest = max(sum(t.numel() * t.element_size() for t in group.values()) for group, _ in groups)
    assert len(groups) > 3 * 256 and largest <= 7168 * 7168 * 2  # the largest: kv_b_proj, bf16 [hidden, hidden]


def test_shards_are_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    from w4a8conv.synthetic import build_tensors

    spec = SyntheticSpec(shards=3)
    src = write_checkpoint(tmp_path / "s", "v1.0.0-per-channel", spec)
    loaded = {}
    for shard in src.glob("*-of-*.safetensors"):
        loaded.update(load_file(shard))
    expected, _ = build_tensors(spec, "v1.0.0-per-channel", 1)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
