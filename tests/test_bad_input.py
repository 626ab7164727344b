"""Bad input: one clear line naming the file and tensor, exit code 2, no traceback, no output that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET, cli
from .conftest import cli as run

runner = CliRunner()
EXPERT = "model.layers.1.mlp.experts.0.gate_proj"


def _index(ckpt):
    """The checkpoint's Hugging Face index, whatever its writer named it."""
    return next(ckpt.glob("*.safetensors.index.json"))


def edit_tensor(ckpt: Path, name: str, change) -> None:
    """Apply ``change(tensors) `` to the shard holding ``name`` (tensors may be added, changed or dropped)."""
    index = json.loads((_index(ckpt)).read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def edit_description(ckpt: Path, change) -> None:
    path = ckpt / "quant_model_description.json"
    description = json.loads(path.read_text())
    change(description)
    path.write_text(json.dumps(description))


def assert_refused(tmp_path: Path, src: Path, *fragments: str) -> str:
    out = tmp_path / "out"
    code, stdout, stderr = run("convert", "--in", src, "--out", out)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr  # progress lines may precede it
    assert "Traceback" not in stderr + stdout
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not list(out.glob("*.safetensors.index.json")) and not (out / "quant_model_description.json").exists()
    return errors[0]


@pytest.fixture
def mindie(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "src", "mindie")


@pytest.fixture
def v1(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "src", "v1.0.0-per-group")


def test_missing_description(tmp_path, mindie):
    (mindie / "quant_model_description.json").unlink()
    line = assert_refused(tmp_path, mindie, "no quant_model_description.json", "not an msModelSlim checkpoint")
    assert str(mindie) in line
    assert not (tmp_path / "out").exists()


def test_two_descriptions_named_by_quant_type_are_refused(tmp_path, mindie):
    (mindie / "quant_model_description.json").rename(mindie / "quant_model_description_w4a8_dynamic.json")
    shutil.copy(mindie / "quant_model_description_w4a8_dynamic.json", mindie / "quant_model_description_w8a8.json")
    assert_refused(tmp_path, mindie, "several descriptions", "quant_model_description_w8a8.json")


def test_an_unfinished_output_is_named_as_one(tmp_path, source_checkpoints, converted_checkpoints):
    out = tmp_path / "out"
    shutil.copytree(converted_checkpoints["mindie"], out)
    (out / "quant_model_description.json").unlink()
    (out / ".w4a8conv").mkdir()
    for command in (("inspect", out), ("verify", source_checkpoints["mindie"], out)):
        code, _, stderr = run(*command)
        assert code == 2 and "an unfinished w4a8conv output" in stderr and "--resume" in stderr, stderr


def test_tensor_listed_but_absent(tmp_path, mindie):
    edit_tensor(mindie, f"{EXPERT}.weight_scale", lambda t: t.pop(f"{EXPERT}.weight_scale"))
    # The index still names it: the shard no longer holds it.
    assert_refused(tmp_path, mindie, f"{EXPERT}.weight_scale", "does not hold it")


def test_description_lists_tensor_no_shard_holds(tmp_path, mindie):
    edit_description(mindie, lambda d: d.update({"model.layers.9.mlp.experts.0.up_proj.weight": "W4A8_DYNAMIC"}))
    assert_refused(tmp_path, mindie, "quant_model_description.json", "model.layers.9.mlp.experts.0.up_proj.weight")


def test_wrong_shape(tmp_path, mindie):
    name = f"{EXPERT}.weight"
    edit_tensor(mindie, name, lambda t: t.update({name: t[name][:60].contiguous()}))
    assert_refused(tmp_path, mindie, name, "fits neither [out, in] nor [out/2, in] for out=64")


def test_group_size_differs_between_modules(tmp_path, mindie):
    name = f"{EXPERT}.weight"
    edit_tensor(mindie, name, lambda t: t.update({name: t[name][:, :96].contiguous()}))  # 96 inputs in 4 groups
    assert_refused(tmp_path, mindie, "use group size 32 except", f"{EXPERT}.weight_scale_second gives 24")


def test_output_dim_not_divisible_by_8(tmp_path):
    src = write_checkpoint(tmp_path / "src", "mindie", SyntheticSpec(intermediate=36, group_size=4, w4a8_linear=False))
    assert_refused(tmp_path, src, "gate_proj.weight", "not divisible by 8")


def test_input_dim_not_divisible_by_group_size(tmp_path, mindie):
    name = f"{EXPERT}.weight_scale_second"
    edit_tensor(mindie, name, lambda t: t.update({name: torch.ones(64, 3)}))  # 128 inputs in 3 groups
    assert_refused(tmp_path, mindie, name, "does not divide [64, 128] into groups")


def test_group_size_contradicts_description(tmp_path, v1):
    edit_description(v1, lambda d: d.update({"group_size": 64}))
    assert_refused(tmp_path, v1, "group_size is 64", "give 32")


def test_version_contradicts_layout(tmp_path, mindie):
    edit_description(mindie, lambda d: d.update({"version": "1.0.0", "group_size": 32}))
    assert_refused(tmp_path, mindie, "version is '1.0.0'", "one int4 per byte")
    code, stdout, _ = run("inspect", mindie, "--json")
    report = json.loads(stdout)
    assert code == 2 and report["format"] == "mindie" and "one int4 per byte" in report["problems"][0]


def test_nonzero_offsets_leave_visibly_unfinished_output(tmp_path, mindie):
    name = "model.layers.2.mlp.experts.3.down_proj.weight_offset_second"
    edit_tensor(mindie, name, lambda t: t[name].__setitem__((5, 1), 2))
    assert_refused(tmp_path, mindie, name, "non-zero offsets")
    assert (tmp_path / "out").is_dir()  # work was under way; no index or description says it is unfinished


def test_int4_out_of_range_in_mindie_weight(tmp_path, mindie):
    name = f"{EXPERT}.weight"
    edit_tensor(mindie, name, lambda t: t[name].__setitem__((0, 0), 9))
    assert_refused(tmp_path, mindie, name, "outside -8..7")


def test_nan_scale(tmp_path, v1):
    name = f"{EXPERT}.weight_scale"
    edit_tensor(v1, name, lambda t: t[name].__setitem__((3, 0), float("nan")))
    assert_refused(tmp_path, v1, name, "NaN or Inf")


def test_truncated_shard(tmp_path, mindie):
    shard = sorted(mindie.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_refused(tmp_path, mindie, shard.name, "truncated")


def test_output_inside_input_or_not_empty(tmp_path, mindie):
    code, _, stderr = run("convert", "--in", mindie, "--out", mindie / "converted")
    assert code == 2 and "must not be, contain or lie inside" in stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, _, stderr = run("convert", "--in", mindie, "--out", tmp_path / "busy")
    assert code == 2 and "not an empty directory" in stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_already_processed_input(tmp_path, mindie):
    assert run("convert", "--in", mindie, "--out", tmp_path / "once")[0] == 0
    code, _, stderr = run("convert", "--in", tmp_path / "once", "--out", tmp_path / "twice")
    assert code == 2 and "already processed" in stderr


def test_json_mode_reports_errors_as_json(tmp_path, mindie):
    (mindie / "quant_model_description.json").unlink()
    code, stdout, _ = run("convert", "--in", mindie, "--out", tmp_path / "out", "--json")
    assert code == 2
    assert json.loads(stdout) == {"ok": False, "error": json.loads(stdout)["error"]}


def test_installed_entry_point_prints_no_traceback(tmp_path, mindie):
    (mindie / "quant_model_description.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "w4a8conv.cli", "inspect", str(mindie), "--target", LEGACY_TARGET],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "quant_model_description.json: not valid JSON" in proc.stderr


def test_entry_point_reports_a_problem_found_after_torch_loaded(tmp_path, mindie):
    # The entry point ends the process without Python's teardown once torch is loaded: the exit code
    # and the error line must still come out.
    name = f"{EXPERT}.weight"
    edit_tensor(mindie, name, lambda t: t[name].__setitem__((0, 0), 9))
    cmd = [sys.executable, "-m", "w4a8conv.cli", "convert", "--in", str(mindie), "--out", str(tmp_path / "o")]
    cmd += ["--target", LEGACY_TARGET]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {mindie}/")
    assert "outside -8..7" in proc.stderr


# --- hostile files ------------------------------------------------------------------------------------


def rewrite_header(shard: Path, change) -> None:
    """Let ``change(header_dict)`` edit a shard's JSON header; the data bytes stay as they are."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


def test_header_lies_about_offsets(tmp_path, mindie):
    shard = first_shard(mindie)
    victim = {}

    def lie(header):
        name = next(k for k in header if k != "__metadata__")
        victim["name"] = name
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 10**9, end + 10**9]

    rewrite_header(shard, lie)
    assert_refused(tmp_path, mindie, shard.name, victim["name"], "truncated shard?")


def test_header_overlapping_tensors(tmp_path, mindie):
    shard = first_shard(mindie)

    def overlap(header):
        names = [k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32"][:2]
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
        header[names[1]]["shape"] = header[names[0]]["shape"]

    rewrite_header(shard, overlap)
    assert_refused(tmp_path, mindie, shard.name, "overlap in the file")


def test_header_lies_about_dtype(tmp_path, mindie):
    shard = first_shard(mindie)
    victim = {}

    def lie(header):
        name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "I8")
        victim["name"] = name
        header[name]["dtype"] = "I32"

    rewrite_header(shard, lie)
    assert_refused(tmp_path, mindie, shard.name, victim["name"], "needs")


def test_unknown_dtype(tmp_path, mindie):
    shard = first_shard(mindie)
    rewrite_header(shard, lambda h: h[next(k for k in h if k != "__metadata__")].update({"dtype": "Q4"}))
    assert_refused(tmp_path, mindie, shard.name, "unknown dtype 'Q4'")


def test_huge_header(tmp_path, mindie):
    shard = first_shard(mindie)
    raw = bytearray(shard.read_bytes())
    raw[:8] = (1 << 40).to_bytes(8, "little")
    shard.write_bytes(bytes(raw))
    assert_refused(tmp_path, mindie, shard.name, "header claims 1099511627776 bytes")


def test_index_names_a_missing_file(tmp_path, mindie):
    first_shard(mindie).unlink()
    assert_refused(tmp_path, mindie, "index.json", "which does not exist")


def test_duplicate_tensor_names_across_shards(tmp_path, mindie):
    shards = sorted(mindie.glob("*.safetensors"))
    name = "model.norm.weight"
    holder = next(s for s in shards if name in load_file(s))
    other = next(s for s in shards if s != holder)
    tensors = load_file(other)
    tensors[name] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, other, metadata={"format": "pt"})
    assert_refused(tmp_path, mindie, name, "duplicate name")


def test_symlink_out_of_the_checkpoint_is_not_followed(tmp_path, mindie):
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    (mindie / "tokenizer.json").symlink_to(secret)
    assert_refused(tmp_path, mindie, "tokenizer.json", "outside the checkpoint directory; not following it")


def test_description_disagrees_with_tensors(tmp_path, v1):
    # A packed int4 weight described as W8A8 would be copied as int8 garbage: refuse, naming it.
    name = f"{EXPERT}.weight"
    edit_description(v1, lambda d: d.update({name: "W8A8_DYNAMIC"}))
    code, stdout, _ = run("inspect", v1, "--json")
    assert code == 2 and any(f"{name}: described as W8A8_DYNAMIC" in p for p in json.loads(stdout)["problems"])
    assert_refused(tmp_path, v1, name, "as W4A8_DYNAMIC weights do")


def test_linear_described_as_w8a8_is_not_copied_silently(tmp_path, mindie):
    name = "model.layers.0.self_attn.o_proj.weight"
    edit_description(mindie, lambda d: d.update({name: "W8A8_DYNAMIC"}))
    assert_refused(tmp_path, mindie, name, "has model.layers.0.self_attn.o_proj.weight_scale_second")


def test_output_equal_to_or_containing_the_input(tmp_path, mindie):
    for out in (mindie, mindie.parent):
        code, _, stderr = run("convert", "--in", mindie, "--out", out)
        assert code == 2 and "must not be, contain or lie inside --in" in stderr


def _rewrite_header(shard: Path, header: bytes) -> None:
    """Replace a shard's header and keep its data (offsets count from the data's start, so they stay valid)."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    padded = header + b" " * (-len(header) % 8)
    shard.write_bytes(struct.pack("<Q", len(padded)) + padded + raw[8 + length :])


def _first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*-of-*.safetensors"))[0]


def test_a_safetensors_file_the_index_does_not_name_is_refused(tmp_path, mindie):
    stray = mindie / "model-extra.safetensors"
    save_file({"model.layers.0.input_layernorm.weight": torch.zeros(4)}, stray)
    assert_refused(tmp_path, mindie, f"{stray}: a safetensors file the index does not name")


def test_a_header_naming_a_tensor_twice_is_refused(tmp_path, mindie):
    shard = _first_shard(mindie)
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    _rewrite_header(shard, (text[:-1] + ", " + entry + "}").encode())
    assert_refused(tmp_path, mindie, f"{shard}: safetensors header names {name!r} twice")


def test_a_utf16_header_is_refused(tmp_path, mindie):
    shard = _first_shard(mindie)
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    _rewrite_header(shard, raw[8 : 8 + length].rstrip(b" ").decode().encode("utf-16"))
    assert_refused(tmp_path, mindie, f"{shard}: safetensors header is not UTF-8")


def test_a_nul_in_an_index_value_is_refused_at_plan_time(tmp_path, mindie):
    index_path = _index(mindie)
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] += "\x00"
    index_path.write_text(json.dumps(index))
    assert_refused(tmp_path, mindie, f"tensor {name} maps to")


def test_a_file_name_that_is_not_utf8_is_refused_at_plan_time(tmp_path, mindie):
    with open(os.fsencode(mindie) + b"/notes-\xff.txt", "wb") as f:
        f.write(b"x")
    code, _, stderr = run("convert", "--in", mindie, "--out", tmp_path / "out")
    assert code == 2 and "the file name is not UTF-8; rename it" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["index", "description", "config.json", "tokenizer.json", "shard"])
def test_a_fifo_in_the_input_is_refused_not_read(tmp_path, mindie, name):
    """A FIFO named like a file the conversion reads would block it forever."""
    index = _index(mindie)
    target = {
        "index": index,
        "description": mindie / "quant_model_description.json",
        "config.json": mindie / "config.json",
        "tokenizer.json": mindie / "tokenizer.json",
        "shard": mindie / json.loads(index.read_text())["weight_map"]["lm_head.weight"],
    }[name]
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    for command in (["inspect", mindie], ["convert", "--in", mindie, "--out", tmp_path / "out"]):
        proc = subprocess.run(
            [sys.executable, "-m", "w4a8conv.cli", *map(str, command), "--target", LEGACY_TARGET],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"{target}: not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_subdirectory_that_cannot_be_read_is_refused(tmp_path, mindie, monkeypatch):
    (mindie / "optional").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("optional"):  # as for a directory without read permission (root reads all)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, _, stderr = run("convert", "--in", mindie, "--out", tmp_path / "out")
    assert code == 2 and f"{mindie / 'optional'}: cannot read: Permission denied; its files would be missing" in stderr
    assert not (tmp_path / "out").exists()


def test_a_description_larger_than_the_cap_is_refused(tmp_path, mindie, monkeypatch):
    monkeypatch.setattr("w4a8conv.reading.checkpoint.MAX_JSON_BYTES", 1000)
    code, _, stderr = run("inspect", mindie)
    assert code == 2 and "quant_model_description.json: larger than 1000 bytes" in stderr


@pytest.mark.parametrize(("role", "value"), [("weight_scale_second", 1e9), ("weight_scale", 3e38)])
def test_finite_scales_that_overflow_the_processed_tensors_are_refused(tmp_path, role, value):
    """The per-group product is rounded through fp16 (largest 65504): finite sources, an Inf scale."""
    src = write_checkpoint(tmp_path / "src", "mindie", SyntheticSpec(w4a8_linear=False))
    prefix = "model.layers.1.mlp.experts.0.down_proj"
    name = f"{prefix}.{role}"
    edit_tensor(src, name, lambda t: t[name].__setitem__((0, 0), value))
    error = assert_refused(tmp_path, src, f"tensor {prefix}.weight_scale: its scales make")
    assert f"{prefix}.weight_scale overflow to Inf or NaN" in error


@pytest.mark.parametrize("role", ["weight_scale", "weight_scale_second", "scale_bias"])
def test_a_nan_scale_anywhere_is_refused_before_any_shard_is_written(tmp_path, v1, role):
    """The last shard's module: processing would have written the other shards first."""
    types = json.loads((v1 / "quant_model_description.json").read_text())
    index = {n: f for n, f in json.loads(_index(v1).read_text())["weight_map"].items() if types[n] == "W4A8_DYNAMIC"}
    last = max(f for n, f in index.items() if n.endswith(f".down_proj.{role}"))
    name = max(n for n, f in index.items() if f == last and ".mlp.experts." in n and n.endswith(f".down_proj.{role}"))
    edit_tensor(v1, name, lambda t: t[name].__setitem__((0, 0), float("inf")))
    code, _, stderr = run("convert", "--in", v1, "--out", tmp_path / "dry", "--dry-run")
    assert code == 2 and f"tensor {name}: holds NaN or Inf" in stderr
    assert_refused(tmp_path, v1, name, "NaN or Inf")
    assert not list((tmp_path / "out").glob("*.safetensors*"))


def test_hostile_inputs_get_one_line_and_exit_2_before_anything_is_written(source_checkpoints, tmp_path):
    """A symlink loop, a shard whose name is not UTF-8 (no index), a 65 MiB index, group_size as a
    string: one line naming the file, exit 2, nothing written."""
    base = source_checkpoints["v1.0.0-per-channel"]
    cases = {}

    loop = tmp_path / "loop"
    shutil.copytree(base, loop)
    (loop / "a.json").symlink_to(loop / "b.json")
    (loop / "b.json").symlink_to(loop / "a.json")
    cases["loop"] = (loop, "a symbolic link loop")

    single = tmp_path / "non-utf8"
    single.mkdir()
    tensors = {}
    for shard in base.glob("*.safetensors"):
        tensors.update(load_file(shard))
    save_file(tensors, os.fsdecode(bytes(single) + b"/model-\xff.safetensors"))
    shutil.copy(base / "quant_model_description.json", single)
    cases["non-utf8"] = (single, "the file name is not UTF-8; rename it")

    huge = tmp_path / "huge"
    shutil.copytree(base, huge)
    index = next(huge.glob("*.index.json"))
    with open(index, "ab") as f:
        f.write(b" " * (65 << 20))
    cases["huge"] = (huge, "larger than 67108864 bytes; not a description, index or config")

    string = tmp_path / "string"
    shutil.copytree(base, string)
    description = json.loads((string / "quant_model_description.json").read_text())
    description["group_size"] = "0"
    (string / "quant_model_description.json").write_text(json.dumps(description))
    cases["string"] = (string, 'group_size is "0", a str; vllm-ascend reads an integer')

    for name, (src, message) in cases.items():
        out = tmp_path / f"out-{name}"
        code, _, stderr = cli("convert", "--in", src, "--out", out)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (name, stderr)
        assert not out.exists(), name


def test_an_input_directory_that_cannot_be_listed_is_one_line(source_checkpoints, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], src)
    listing = Path.iterdir

    def refused(path):
        if path == src:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", refused)
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out")
    assert code == 2 and f"{src}: cannot list the directory: Permission denied" in stderr and stderr.count("\n") == 1


def test_a_hugging_face_cache_snapshot_is_read_as_it_is(source_checkpoints, tmp_path):
    """`hf download` without --local-dir: snapshots/<rev>/ whose files link to ../../blobs/<hash>. Read as
    it is; a link anywhere else is still refused, saying how to work round it."""
    repo = tmp_path / "models--org--DeepSeek-W4A8"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(source_checkpoints["v1.0.0-per-channel"].rglob("*"))):
        if path.is_file():
            blob = blobs / f"blob{i}"
            shutil.copy(path, blob)
            link = snapshot / path.relative_to(source_checkpoints["v1.0.0-per-channel"])
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    code, _, stderr = cli("convert", "--in", snapshot, "--out", tmp_path / "out")
    assert code == 0, stderr
    assert verify_conversion(snapshot, tmp_path / "out").ok
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("x")
    (snapshot / "notes.txt").symlink_to(outside)
    code, _, stderr = cli("convert", "--in", snapshot, "--out", tmp_path / "out2")
    assert code == 2 and "outside the checkpoint directory" in stderr and "cp -L" in stderr


def test_a_file_of_the_input_that_cannot_be_read_is_found_before_writing(source_checkpoints, tmp_path, monkeypatch):
    """A tokenizer file nobody may read (root reads everything here: the open is refused for the test)."""
    import builtins

    from w4a8conv.reading import checkpoint

    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], src)
    locked = src / "tokenizer_config.json"
    real_open = builtins.open

    def refusing(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", refusing, raising=False)
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out")
    assert code == 2 and f"{locked}: cannot read: Permission denied" in stderr
    assert not (tmp_path / "out").exists()
