"""verify: a good conversion passes, and every kind of wrong output or impossible source is named."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.converting.jobs import finalize
from w4a8conv.formats.sources import get_source
from w4a8conv.names import CANARY_FILE, DESCRIPTION_FILE, MANIFEST_FILE, TOOL_SECTION
from w4a8conv.safetensors_io import read_header, staging
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET, cli

runner = CliRunner()
DESCRIPTION = "quant_model_description.json"


def test_verify_accepts_every_layout(source_checkpoints, converted_checkpoints, layout):
    report = verify_conversion(source_checkpoints[layout], converted_checkpoints[layout])
    assert report.ok, report.problems
    assert report.modules_checked == report.modules_total > 0
    assert report.passthrough_checked > 0 and report.files_hashed >= 5
    # config, generation_config, tokenizer_config; msModelSlim's CLI adds its best-practice YAML and QuaRot's rotation
    assert report.other_files_checked == (5 if get_source(layout).packed_on_disk else 3)


@pytest.mark.parametrize("checksums", [True, False])
def test_verify_compares_the_copied_files_with_the_source(source_checkpoints, tmp_path, checksums):
    # Without a manifest nothing else looks at them; with one, only that they did not change since.
    src = source_checkpoints["v1.0.0-per-channel"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=checksums, target=LEGACY_TARGET).out_dir
    _flip(out / "generation_config.json", 3)
    (out / "tokenizer_config.json").unlink()
    code, stdout, _ = cli("verify", src, out)
    assert code == 1
    assert f"{out / 'generation_config.json'}: differs from {src / 'generation_config.json'}" in stdout
    assert f"{out / 'tokenizer_config.json'}: missing (the input has {src / 'tokenizer_config.json'})" in stdout
    assert ("sha256 differs" in stdout) is checksums


@pytest.mark.parametrize("checksums", [True, False])
def test_verify_flags_a_file_the_conversion_did_not_write(source_checkpoints, tmp_path, checksums):
    src = source_checkpoints["v1.0.0-per-group"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=checksums, target=LEGACY_TARGET).out_dir
    (out / "leftover.safetensors.partial").write_bytes(b"\0" * 16)
    code, stdout, _ = cli("verify", src, out)
    expected = f"not in {MANIFEST_FILE}" if checksums else "not part of the conversion"
    assert code == 1 and f"{out / 'leftover.safetensors.partial'}: {expected}" in stdout


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"group_size": 64}, "group_size is 64, expected 32"),  # vllm-ascend sizes its scale tensors by it
        ({"version": None}, "version is absent, expected '1.0.0'"),
        ({"extra": 1}, "extra is 1, expected absent"),
        ({"w4a8conv": {"source_layout": "mindie"}}, "w4a8conv.source_layout is 'mindie', expected 'v1.0.0-per-group'"),
        ({"w4a8conv": {"group_size": 0}}, "w4a8conv.group_size is 0, expected 32"),
    ],
)
def test_verify_checks_the_description_keys_a_loader_reads(source_checkpoints, tmp_path, change, expected):
    src = source_checkpoints["v1.0.0-per-group"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=False, target=LEGACY_TARGET).out_dir
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            description[key].update(value)
        elif value is None:
            del description[key]
        else:
            description[key] = value
    path.write_text(json.dumps(description, indent=2))
    code, stdout, _ = cli("verify", src, out, "--sample", "0.1")
    assert code == 1 and f"{path}: {expected}" in stdout


@pytest.mark.parametrize(
    "role,value,expected",
    [
        ("weight_offset_second", 1, "non-zero offsets, which W4A8_DYNAMIC cannot hold"),
        ("weight_scale", float("nan"), "holds NaN or Inf"),  # NaN would compare unequal to nothing below
    ],
)
def test_verify_refuses_a_source_that_no_output_converts(
    source_checkpoints, converted_checkpoints, tmp_path, role, value, expected
):
    src = _copy(source_checkpoints["mindie"], tmp_path)
    name = f"model.layers.1.mlp.experts.0.down_proj.{role}"
    info = _tensor(src, name)
    dtype = {"F32": "<f4", "I64": "<i8"}[info.dtype]
    _write_at(info.path, info.begin, np.array([value], dtype=dtype).tobytes())
    code, stdout, _ = cli("verify", src, converted_checkpoints["mindie"])
    assert code == 1 and f"{info.path}: tensor {name}: {expected}" in stdout


def test_verify_refuses_a_source_description_that_names_a_missing_tensor(
    source_checkpoints, converted_checkpoints, tmp_path
):
    src = _copy(source_checkpoints["mindie"], tmp_path)
    path = src / "quant_model_description.json"
    description = json.loads(path.read_text())
    description["model.layers.1.mlp.experts.0.down_proj.weight_offsets"] = "W4A8_DYNAMIC"
    path.write_text(json.dumps(description))
    code, stdout, _ = cli("verify", src, converted_checkpoints["mindie"])
    expected = f"{path}: lists tensor model.layers.1.mlp.experts.0.down_proj.weight_offsets, which no shard holds"
    assert code == 1 and expected in stdout


@pytest.mark.parametrize("change", [lambda v: v * (1 + 4e-6), lambda v: np.float32("nan")])
def test_verify_recomputes_a_mindie_bias_to_the_last_bits(source_checkpoints, tmp_path, change):
    # 4e-6 is ~30 fp32 steps: it passed a relative tolerance of 1e-5; NaN passed every comparison.
    src = source_checkpoints["mindie"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=False, target=LEGACY_TARGET).out_dir
    name = "model.layers.0.self_attn.o_proj.scale_bias"
    info = _tensor(out, name)
    values = np.fromfile(info.path, dtype=np.float32, count=info.nbytes // 4, offset=info.begin)
    largest = int(np.abs(values).argmax())  # a bias near 0 is below the bound's steps: change the largest
    _write_at(info.path, info.begin + 4 * largest, np.float32(change(values[largest])).tobytes())
    code, stdout, _ = cli("verify", src, out)
    assert code == 1 and "model.layers.0.self_attn.o_proj.scale_bias: differs from 8 * sum(w * s)" in stdout


def test_verify_checks_the_type_that_marks_a_processed_tensor(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=False, target=LEGACY_TARGET).out_dir
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    name = "model.layers.1.mlp.experts.1.up_proj.weight_scale"
    assert description[name] == "W4A8_DYNAMIC_PREPACKED"
    description[name] = "W4A8_DYNAMIC"  # a loader would process this tensor a second time
    path.write_text(json.dumps(description, indent=2))
    code, stdout, _ = cli("verify", src, out, "--sample", "0.1")
    assert code == 1
    assert f"{path}: {name} is described as 'W4A8_DYNAMIC', not 'W4A8_DYNAMIC_PREPACKED'" in stdout


def test_verify_sample_checks_a_fraction(source_checkpoints, converted_checkpoints):
    code, stdout, _ = cli(
        "verify", source_checkpoints["mindie"], converted_checkpoints["mindie"], "--sample", "0.2", "--json"
    )
    report = json.loads(stdout)
    assert code == 0 and report["ok"] and report["modules_checked"] == 6 and report["modules_total"] == 30


def _copy(tree: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(tree, target)
    return target


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes of ``path`` at ``offset``, as a bit rot or a bad tool would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _tensor(out: Path, name: str):
    for shard in out.glob("*.safetensors"):
        header = read_header(shard)
        if name in header.tensors:
            return header.tensors[name]
    raise KeyError(name)


@pytest.mark.parametrize(
    "tensor,expected",
    [
        ("model.layers.1.mlp.experts.2.up_proj.weight", "int4 values differ"),
        ("model.layers.2.mlp.experts.0.down_proj.weight_scale", "differs from the source scales"),
        ("model.layers.1.mlp.experts.3.gate_proj.scale_bias", "recomputed in float64"),
        ("model.layers.0.self_attn.o_proj.weight_scale_second", "differs from the source scales"),
        ("model.layers.1.mlp.shared_experts.down_proj.weight", "bytes differ from the source"),
    ],
)
def test_verify_finds_a_changed_tensor(source_checkpoints, converted_checkpoints, tmp_path, tensor, expected):
    out = _copy(converted_checkpoints["mindie"], tmp_path)
    info = _tensor(out, tensor)
    _flip(info.path, info.begin + 1)
    code, stdout, _ = cli("verify", source_checkpoints["mindie"], out)
    assert code == 1
    assert expected in stdout and "sha256 differs" in stdout


def test_verify_reports_the_same_problems_in_the_same_order_on_any_number_of_threads(
    source_checkpoints, converted_checkpoints, tmp_path
):
    out = _copy(converted_checkpoints["mindie"], tmp_path)
    for name in (
        "model.layers.2.mlp.experts.1.down_proj.weight",
        "model.layers.1.mlp.experts.2.up_proj.weight",
        "model.layers.0.self_attn.o_proj.weight_scale_second",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
    ):
        info = _tensor(out, name)
        _flip(info.path, info.begin + 1)
    reports = [verify_conversion(source_checkpoints["mindie"], out, workers=n).as_dict() for n in (1, 3)]
    assert reports[0] == reports[1]
    code, stdout, _ = cli("verify", source_checkpoints["mindie"], out, "--workers", "2", "--json")
    assert code == 1 and json.loads(stdout) == {
        "in_dir": str(source_checkpoints["mindie"]),
        "out_dir": str(out),
        **reports[0],
    }
    code, _, stderr = cli("verify", source_checkpoints["mindie"], out, "--workers", "0")
    assert code == 2 and "--workers 0: need at least 1" in stderr
    problems = reports[0]["problems"]
    assert len(problems) == 4 + len([p for p in problems if "sha256 differs" in p])
    assert [p for p in problems if "int4 values differ" in p] == [
        f"{_tensor(out, name).path}: tensor {name}: int4 values differ from the source"
        for name in ("model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.2.mlp.experts.1.down_proj.weight")
    ]


@pytest.mark.parametrize("layout", ["mindie", "v1.0.0-per-group"])
def test_verify_reads_large_tensors_direct_and_still_accepts_a_good_conversion(
    source_checkpoints, converted_checkpoints, monkeypatch, direct_io_calls, layout
):
    # The synthetic tensors are small: lower the threshold so that most of them are read with O_DIRECT,
    # as DeepSeek-R1's weights are, each into memory of its own while any array uses it.
    monkeypatch.setattr(staging, "DIRECT_MIN_BYTES", 4096)
    for workers in (1, 4):
        report = verify_conversion(source_checkpoints[layout], converted_checkpoints[layout], workers=workers)
        assert report.ok, report.problems
    reads = sum(kind == "read" for kind, *_ in direct_io_calls)
    if not reads:
        pytest.skip("this filesystem takes no O_DIRECT")
    assert reads > 100


def test_verify_stops_at_an_unreadable_module_without_checking_the_rest(
    source_checkpoints, converted_checkpoints, monkeypatch
):
    checked = []

    def unreadable(prefix, *args):  # the first module's file cannot be read; the others take a while
        checked.append(prefix)
        if len(checked) == 1:
            raise PermissionError(13, "Permission denied", "shard.safetensors")
        time.sleep(0.05)

    monkeypatch.setattr("w4a8conv.verify.modules.check_module", unreadable)
    code, _, stderr = cli("verify", source_checkpoints["mindie"], converted_checkpoints["mindie"], "--workers", "1")
    errors = [line for line in stderr.splitlines() if not line.startswith("[")]  # but the progress lines
    assert code == 1 and errors == ["error: shard.safetensors: permission denied"]
    assert 1 <= len(checked) <= 2  # of 30 modules: the rest were cancelled


@pytest.mark.parametrize(
    "layout,value,expected",
    [("mindie", 9, "values outside the int4 range -8..7"), ("v1.0.0-per-group", 0x5A, "int4 values differ")],
)
def test_verify_finds_a_changed_source_weight(
    source_checkpoints, converted_checkpoints, tmp_path, layout, value, expected
):
    src = _copy(source_checkpoints[layout], tmp_path)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    info = _tensor(src, name)
    current = info.path.read_bytes()[info.begin + 3]
    _write_at(info.path, info.begin + 3, bytes([value if current != value else value ^ 1]))
    report = verify_conversion(src, converted_checkpoints[layout])
    assert [p for p in report.problems if name in p and expected in p], report.problems


def test_verify_finds_missing_and_unlisted_files(source_checkpoints, converted_checkpoints, tmp_path):
    out = _copy(converted_checkpoints["mindie"], tmp_path)
    (out / "tokenizer_config.json").unlink()
    (out / "notes.txt").write_text("stray")
    report = verify_conversion(source_checkpoints["mindie"], out)
    assert not report.ok
    assert any("tokenizer_config.json: listed in" in p for p in report.problems)
    assert any("notes.txt: not in" in p for p in report.problems)


def test_verify_finds_a_wrong_index(source_checkpoints, converted_checkpoints, tmp_path):
    out = _copy(converted_checkpoints["v1.0.0-per-group"], tmp_path)
    index_path = next(out.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    report = verify_conversion(source_checkpoints["v1.0.0-per-group"], out)
    assert any("total_size" in p for p in report.problems)


def test_convert_verify_flag_and_manifest(source_checkpoints, tmp_path):
    code, stdout, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "o", "--verify")
    assert code == 0, stderr
    assert "verified: 30 of 30 W4A8 modules" in stdout
    listed = [line.split("  ")[1] for line in (tmp_path / "o" / MANIFEST_FILE).read_text().splitlines()]
    assert DESCRIPTION in listed and any(n.endswith(".safetensors") for n in listed)
    check = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST_FILE], cwd=tmp_path / "o", check=False)
    assert check.returncode == 0


def test_convert_no_checksums_json_and_verify(source_checkpoints, tmp_path):
    args = ["convert", "--in", source_checkpoints["v1.0.0-per-channel"], "--out", tmp_path / "o", "--no-checksums"]
    code, stdout, stderr = cli(*args, "--verify", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["checksums"] is False and summary["verify"]["manifest"] is False
    assert not (tmp_path / "o" / MANIFEST_FILE).exists()
    code, stdout, _ = cli("verify", source_checkpoints["v1.0.0-per-channel"], tmp_path / "o")
    assert code == 0 and "no checksum manifest (--no-checksums)" in " ".join(stdout.split())  # Rich wraps lines


def test_verify_flags_a_missing_manifest_where_the_description_names_one(
    source_checkpoints, converted_checkpoints, tmp_path
):
    out = _copy(converted_checkpoints["mindie"], tmp_path)
    (out / MANIFEST_FILE).unlink()
    report = verify_conversion(source_checkpoints["mindie"], out)
    assert not report.ok and report.manifest and any("checksum manifest missing" in p for p in report.problems)


def test_verify_still_checks_a_manifest_left_beside_a_no_checksums_output(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    convert_checkpoint(src, tmp_path / "o", checksums=False, target=LEGACY_TARGET)
    (tmp_path / "o" / MANIFEST_FILE).write_text(f"{'0' * 64}  {DESCRIPTION}\n")
    report = verify_conversion(src, tmp_path / "o")
    assert not report.ok and any("sha256 differs" in p for p in report.problems)


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "no index", "index not JSON"])
def test_a_damaged_output_is_a_failed_verification_not_bad_input(
    source_checkpoints, converted_checkpoints, tmp_path, damage
):
    out = tmp_path / "out"
    shutil.copytree(converted_checkpoints["mindie"], out)
    shard = sorted(out.glob("*.safetensors"))[1]
    index = next(out.glob("*.index.json"))
    if damage == "truncated shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "missing shard":
        shard.unlink()
    elif damage == "no index":
        index.unlink()
    else:
        index.write_text("{not json")
    code, stdout, stderr = cli("verify", source_checkpoints["mindie"], out)
    assert code == 1 and "verification failed" in stdout and "Traceback" not in stdout + stderr, stderr
    named = {"truncated shard": shard, "missing shard": shard, "no index": out, "index not JSON": index}[damage]
    assert f"  - {named}" in stdout


def _rewrite_shard_header(shard: Path, change) -> None:
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = change(raw[8 : 8 + length].decode().rstrip(" "))
    padded = text.encode() + b" " * (-len(text.encode()) % 8)
    shard.write_bytes(struct.pack("<Q", len(padded)) + padded + raw[8 + length :])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("header whitespace", "its safetensors header is not the one the conversion writes"),
        ("shard metadata", "its safetensors header is not the one the conversion writes"),
        ("index formatting", "not the bytes the conversion writes"),
        ("description formatting", "not the bytes the conversion writes"),
        ("hidden file", "not part of the conversion"),
        ("fifo", "not part of the conversion"),
    ],
)
def test_without_a_manifest_every_byte_the_conversion_writes_is_checked(source_checkpoints, tmp_path, change, expected):
    src = source_checkpoints["v1.0.0-per-group"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=False, target=LEGACY_TARGET).out_dir
    shard = sorted(out.glob("*.safetensors"))[0]
    index = next(out.glob("*.index.json"))
    description = out / "quant_model_description.json"
    if change == "header whitespace":
        _rewrite_shard_header(shard, lambda text: text.replace('","', '", "', 1))
        named = shard
    elif change == "shard metadata":
        _rewrite_shard_header(shard, lambda text: text.replace("w4a8conv 0.1.0", "w4a8conv 9.9.9"))
        named = shard
    elif change == "index formatting":
        index.write_text(json.dumps(json.loads(index.read_text())))
        named = index
    elif change == "description formatting":
        description.write_text(json.dumps(json.loads(description.read_text()), indent=1) + "\n")
        named = description
    elif change == "hidden file":
        named = out / ".notes"
        named.write_text("x")
    else:
        named = out / "pipe"
        os.mkfifo(named)
    report = verify_conversion(src, out)
    assert not report.ok and report.manifest is False
    assert f"{named}: {expected}" in report.problems, report.problems


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("change", ["one byte", "missing", "digest"])
def test_verify_checks_the_canary_against_the_source(source_checkpoints, tmp_path, checksums, change):
    """The canary is the source's tensors byte for byte, and its sha256 is the one the description records
    (the serving plugin trusts that record): a changed byte, a missing file or a changed record is found."""
    src = source_checkpoints["v1.0.0-per-channel"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=checksums, target=LEGACY_TARGET).out_dir
    canary_file = out / CANARY_FILE
    description_path = out / DESCRIPTION_FILE
    assert verify_conversion(src, out).ok
    if change == "one byte":
        data = bytearray(canary_file.read_bytes())
        data[-1] ^= 0x10
        canary_file.write_bytes(bytes(data))
        expected = f"{canary_file}: not the source's tensors"
    elif change == "missing":
        canary_file.unlink()
        expected = f"{canary_file}: missing; the serving plugin checks the engine with it"
    else:
        description = json.loads(description_path.read_text())
        description[TOOL_SECTION]["canary"]["sha256"] = "0" * 64
        description_path.write_text(json.dumps(description, indent=2) + "\n")
        expected = f"{description_path}: the canary's sha256 is {'0' * 64}"
    report = verify_conversion(src, out)
    assert not report.ok
    assert any(p.startswith(expected) for p in report.problems), report.problems


def test_the_canary_is_not_in_the_index_and_an_array_writes_it_once(source_checkpoints, tmp_path):
    """No loader takes the canary for weights (the index does not name it, its name is no *.safetensors);
    in a job array share 0 writes it and finalize records its digest: the bytes of a single run."""
    src = source_checkpoints["v1.0.0-per-channel"]
    single = convert_checkpoint(src, tmp_path / "single", target=LEGACY_TARGET).out_dir
    index = json.loads(next(single.glob("*.index.json")).read_text())
    assert CANARY_FILE not in set(index["weight_map"].values()) and not CANARY_FILE.endswith(".safetensors")
    for i in (1, 0):
        convert_checkpoint(src, tmp_path / "array", target=LEGACY_TARGET, array_size=2, array_index=i)
    assert finalize(tmp_path / "array") is not None
    for name in (CANARY_FILE, DESCRIPTION_FILE, MANIFEST_FILE):
        assert (tmp_path / "array" / name).read_bytes() == (single / name).read_bytes(), name


def test_verify_refuses_what_no_conversion_comes_from(source_checkpoints, converted_checkpoints, tmp_path):
    """verify certifies a conversion: the output given twice, an output as the source, or a source with no
    W4A8 module is bad input (exit 2), as convert refuses such an input, never `verified: 0 of 0`."""
    out = converted_checkpoints["v1.0.0-per-group"]
    code, _, stderr = cli("verify", out, out)
    assert code == 2 and "the source and the output are the same directory" in stderr
    code, _, stderr = cli("verify", converted_checkpoints["mindie"], out)
    assert code == 2 and "is a w4a8conv output, not a source" in stderr
    src = _copy(source_checkpoints["mindie"], tmp_path)
    description = src / "quant_model_description.json"
    types = json.loads(description.read_text())
    description.write_text(json.dumps({k: ("FLOAT" if v == "W4A8_DYNAMIC" else v) for k, v in types.items()}))
    code, _, stderr = cli("verify", src, out)
    assert code == 2 and "no tensor is W4A8_DYNAMIC: not a W4A8 source checkpoint" in stderr


def test_a_wrong_source_is_named_first_and_the_rest_counted(source_checkpoints, converted_checkpoints):
    """A mindie source given for a per-channel output: the cause first, then at most 10 problems and how
    many more there are, never a list cut without saying so."""
    code, stdout, _ = cli("verify", source_checkpoints["mindie"], converted_checkpoints["v1.0.0-per-channel"])
    lines = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert code == 1
    assert lines[0].startswith(f"  - {source_checkpoints['mindie']}: a mindie checkpoint, but ")
    assert "was converted from a v1.0.0-per-channel one: not its source" in lines[0]
    assert len(lines) == 11 and re.fullmatch(
        r"  \.\.\. and \d+ more problems \(the first 50 listed with --json\)", lines[-1]
    )
    code, stdout, _ = cli("verify", source_checkpoints["mindie"], converted_checkpoints["v1.0.0-per-channel"], "--json")
    report = json.loads(stdout)
    assert report["problems_total"] > len(report["problems"]) == 50
