"""End-to-end conversion: what a user relies on in the output directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from w4a8conv.cli.output import LineProgress
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.formats.sources import get_source
from w4a8conv.names import PREPACKED_TYPE
from w4a8conv.planning.planner import build_plan
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.safetensors_io import read_header
from w4a8conv.serving.runtime import ProcessedCheckpoint
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET, cli
from .test_parallel import tree_bytes


def _all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


def test_experts_of_a_layer_span_shards(source_checkpoints, layout):
    ckpt = open_checkpoint(source_checkpoints[layout])
    files_per_layer = [
        {info.path.name for name, info in ckpt.tensors.items() if name.startswith(f"model.layers.{layer}.mlp.experts.")}
        for layer in (1, 2)
    ]
    assert any(len(files) >= 2 for files in files_per_layer), "the fixture must split a MoE layer across shards"
    assert len(ckpt.shards) == 4


def test_mindie_and_v1_convert_to_identical_packed_tensors(converted_checkpoints):
    mindie = _all_tensors(converted_checkpoints["mindie"])
    v1 = _all_tensors(converted_checkpoints["v1.0.0-per-group"])
    packed = [
        n
        for n in mindie
        if n.endswith((".weight", ".weight_scale", ".weight_scale_second"))
        and (".experts." in n or ".self_attn.q_proj" in n or ".self_attn.o_proj" in n)
    ]
    assert len(packed) > 50
    for name in packed:
        assert mindie[name].dtype == v1[name].dtype and torch.equal(mindie[name], v1[name]), name
    # msModelSlim computes its stored scale_bias from bf16-rounded scales; the mindie bias is
    # recomputed from the fp32 scales, so the two agree only to bf16 precision.
    for name in (n for n in mindie if n.endswith(".scale_bias")):
        torch.testing.assert_close(mindie[name], v1[name], rtol=2e-2, atol=2e-2)


def test_passthrough_tensors_are_byte_identical(source_checkpoints, converted_checkpoints, layout):
    source = open_checkpoint(source_checkpoints[layout])
    out = open_checkpoint(converted_checkpoints[layout])
    passthrough = [n for n in source.tensors if source.description[n] != "W4A8_DYNAMIC"]
    assert any("shared_experts" in n for n in passthrough) and "lm_head.weight" in passthrough
    for name in passthrough:
        a, b = source.tensors[name], out.tensors[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
            fa.seek(a.begin)
            fb.seek(b.begin)
            assert fa.read(a.nbytes) == fb.read(b.nbytes), name


def test_index_and_description_are_consistent(converted_checkpoints, layout):
    out = converted_checkpoints[layout]
    index = json.loads(next(out.glob("*.safetensors.index.json")).read_text())
    headers = {p.name: read_header(p) for p in out.glob("*.safetensors")}
    in_files = {name: shard for shard, h in headers.items() for name in h.tensors}
    assert index["weight_map"] == in_files
    assert index["metadata"]["total_size"] == sum(i.nbytes for h in headers.values() for i in h.tensors.values())
    description = json.loads((out / "quant_model_description.json").read_text())
    tensor_types = {k: v for k, v in description.items() if "." in k and isinstance(v, str)}
    assert set(tensor_types) == set(in_files)  # every tensor typed, nothing stale
    prepacked = {k for k, v in tensor_types.items() if v == PREPACKED_TYPE}
    assert all(".experts." in k or "self_attn" in k for k in prepacked)
    assert "W4A8_DYNAMIC" not in tensor_types.values()  # stock vllm-ascend must not re-process
    section = description["w4a8conv"]
    assert section["source_layout"] == layout
    assert section["group_size"] == description["group_size"] == (0 if not get_source(layout).per_group else 32)
    assert section["tool"] == "w4a8conv" and section["tool_version"]


def test_non_tensor_files_are_copied(source_checkpoints, converted_checkpoints, layout):
    src, out = source_checkpoints[layout], converted_checkpoints[layout]
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    config, served = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    if get_source(layout).described_by_config:
        # served with --quantization ascend: vLLM would pick compressed-tensors from the config and refuse
        quantization = config.pop("quantization_config")
        assert served == config
        description = json.loads((out / "quant_model_description.json").read_text())
        assert description["w4a8conv"]["source_quantization_config"] == quantization
    else:
        assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not list(out.glob("*.partial"))


def test_source_is_untouched(tmp_path):
    src = write_checkpoint(tmp_path / "src", "mindie")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()}
    convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()} == before


def test_output_shards_are_aligned_and_loadable(converted_checkpoints):
    ckpt = ProcessedCheckpoint(converted_checkpoints["mindie"])
    for shard in converted_checkpoints["mindie"].glob("*.safetensors"):
        for info in read_header(shard).tensors.values():
            assert info.begin % min(info.torch_dtype.itemsize, 8) == 0, info.name
    assert ckpt.section["source_layout"] == "mindie"


def test_single_file_checkpoint_without_index(tmp_path):
    """A checkpoint with one unindexed file converts into one shard with an index beside it."""
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-group", SyntheticSpec(shards=1))
    next(src.glob("*.safetensors.index.json")).unlink()
    only = next(src.glob("*.safetensors"))
    only.rename(src / "quant_model_weights.safetensors")
    result = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET)
    assert result.summary.shards == 1
    assert (tmp_path / "out" / "quant_model_weights.safetensors.index.json").is_file()
    assert ProcessedCheckpoint(tmp_path / "out").load_moe("model.layers.1.mlp.experts")["w2_weight"].shape[0] == 4


def test_entry_point_json_summary_through_a_pipe(source_checkpoints, converted_checkpoints, tmp_path):
    """The installed command's JSON summary reaches a reading process whole, with exit code 0.

    (The entry point skips Python's teardown once torch is loaded, so this checks it flushes first.)
    """
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "w4a8conv.cli", "convert", "--in", str(source_checkpoints["mindie"]), "--target"]
    cmd.append(LEGACY_TARGET)
    proc = subprocess.run([*cmd, "--out", str(out), "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["modules"] == 30 and summary["out_dir"] == str(out)
    assert tree_bytes(out) == tree_bytes(converted_checkpoints["mindie"])


def test_dry_run_plans_and_writes_nothing(source_checkpoints, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", out, "--dry-run", "--json")
    assert code == 0, stderr
    plan = json.loads(stdout)
    expected = build_plan(open_checkpoint(source_checkpoints["mindie"]), LEGACY_TARGET)
    assert plan["ok"] and plan["dry_run"] and plan["modules"] == 30 and plan["shards"] == 4
    assert plan["share_shards"] == [s.name for s in expected.shards]
    assert plan["share_output_bytes"] == sum(s.file_size for s in expected.shards)
    assert plan["output_bytes"] == expected.output_bytes and not out.exists()


def _foreign_file(out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _finished(out, src):
    convert_checkpoint(src, out, target=LEGACY_TARGET)


def _read_only(out, src):
    out.mkdir()
    out.chmod(0o500)


@pytest.mark.parametrize("make", [_foreign_file, _finished, _read_only])
def test_dry_run_refuses_an_output_as_the_real_run_does(source_checkpoints, tmp_path, make):
    """--out holding someone's files, a finished conversion, or unwritable: the same line and exit code."""
    src, out = source_checkpoints["mindie"], tmp_path / "out"
    make(out, src) if make is not _foreign_file else make(out)
    if make is _read_only and os.access(out, os.W_OK):
        pytest.skip("running as a user whom permissions do not stop (root)")
    before = sorted(p.name for p in out.iterdir())
    dry = cli("convert", "--in", src, "--out", out, "--dry-run")
    real = cli("convert", "--in", src, "--out", out)
    assert dry[0] == real[0] != 0 and dry[2] == real[2] and dry[2].count("\n") == 1, (dry, real)
    assert sorted(p.name for p in out.iterdir()) == before


def test_dry_run_refuses_an_output_too_small_as_the_real_run_does(source_checkpoints, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    src, out = source_checkpoints["mindie"], tmp_path / "out"
    dry = cli("convert", "--in", src, "--out", out, "--dry-run")
    assert dry[0] == 2 and "needs 0.00 GB more but the filesystem has 0.00 GB free" in dry[2]
    assert not out.exists()
    real = cli("convert", "--in", src, "--out", out)
    assert real[0] == 2 and real[2] == dry[2] and not out.exists()


def test_ci_progress_lines(source_checkpoints, tmp_path):
    """In CI logs: a line per shard written, and a line at least every interval while work goes on."""
    console = Console(record=True, width=200)
    convert_checkpoint(
        source_checkpoints["mindie"], tmp_path / "out", progress=LineProgress(console), target=LEGACY_TARGET
    )
    lines = console.export_text().splitlines()
    assert "converting started: 0 B of" in lines[0] and "0/30 modules" in lines[0]
    assert len(lines) == 6 and all("wrote quant_model_weight_w4a8_dynamic-0000" in line for line in lines[1:5])
    assert "converting ended" in lines[-1] and "30/30 modules" in lines[-1]
    console = Console(record=True, width=200)
    verify_conversion(source_checkpoints["mindie"], tmp_path / "out", progress=LineProgress(console, interval=0))
    text = console.export_text()
    assert "converting" in text and "30/30 modules" in text.splitlines()[-1]
    done, total = re.search(r": (\S+ \S+) of (\S+ \S+) read", text.splitlines()[-1]).groups()
    assert done == total  # a full verify reads what its total says, no more and no less


def test_a_long_step_that_reports_nothing_still_gets_progress_lines(tmp_path):
    """The clock: a module (or a verification) that takes longer than the interval is not silent in a CI log."""
    console = Console(record=True, width=200)
    progress = LineProgress(console, "verifying", interval=0.05)
    progress.start(100, 1)
    time.sleep(0.3)
    progress.update("module", "m", 100)
    progress.finish()
    lines = console.export_text().splitlines()
    assert lines[0].startswith("[") and "verifying started" in lines[0]
    assert sum(line.endswith("MB/s") and "] verifying:" in line for line in lines) >= 3
    assert "verifying ended: 100 B of 100 B read, 1/1 modules" in lines[-1]


def test_the_old_api_mindie_save_is_read_as_written(tmp_path, source_checkpoints):
    """msModelSlim's old llm_ptq API: one weight file, no index, no config.json, and the description named
    after the quant type. Converted as it is; the output's description has the name the engine reads."""
    from safetensors.torch import save_file

    src = tmp_path / "old-api"
    src.mkdir()
    save_file(_all_tensors(source_checkpoints["mindie"]), src / "quant_model_weight_w4a8_dynamic.safetensors")
    description = source_checkpoints["mindie"] / "quant_model_description.json"
    shutil.copy(description, src / "quant_model_description_w4a8_dynamic.json")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "quant_model_description.json",
        "quant_model_weight_w4a8_dynamic.safetensors",
        "quant_model_weight_w4a8_dynamic.safetensors.index.json",
        "w4a8conv.canary",
        "w4a8conv.sha256",
    ]
    assert verify_conversion(src, out).ok


def test_dry_run_names_an_output_it_cannot_create(source_checkpoints, tmp_path, monkeypatch):
    """Where permissions stop the user (not root, which this VM's tests run as), mkdir would fail on --out."""
    real_access = os.access
    parent = tmp_path / "parent"
    parent.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and real_access(path, mode))
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", parent / "a" / "out", "--dry-run")
    out = parent / "a" / "out"
    assert code == 2 and stderr == f"error: --out {out}: cannot be written: {parent / 'a'}: permission denied\n"
