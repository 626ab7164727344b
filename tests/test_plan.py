"""The conversion plan: one object, saved as job.json, read back and compared by fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.converting.jobs import JOB_FILE, read_plan
from w4a8conv.errors import BadInputError
from w4a8conv.names import STATE_DIR
from w4a8conv.planning.plan import ConversionPlan, fingerprint_of
from w4a8conv.planning.planner import build_plan
from w4a8conv.reading.checkpoint import open_checkpoint

from .conftest import LEGACY_TARGET, cli

runner = CliRunner()


def _plan(source_checkpoints, layout="v1.0.0-per-group", **kwargs) -> ConversionPlan:
    return build_plan(open_checkpoint(source_checkpoints[layout]), **{"target": LEGACY_TARGET, **kwargs})


def test_plan_round_trips_through_json(source_checkpoints, layout):
    plan = _plan(source_checkpoints, layout, array_size=3)
    again = ConversionPlan.from_json(json.loads(json.dumps(plan.to_json())), "job.json")
    assert again.fingerprint == plan.fingerprint and again.shards == plan.shards
    assert again.summary == plan.summary and again.index == plan.index and again.shares == plan.shares
    assert [m.prefix for m in again.modules] == [m.prefix for m in plan.modules]
    assert again.modules[0].sources["weight"] == replace(
        plan.modules[0].sources["weight"], path=plan.source / plan.modules[0].sources["weight"].path.name
    )
    assert [i.name for i in again.passthrough] == [i.name for i in plan.passthrough]
    assert dict(again.description) == json.loads(json.dumps(dict(plan.description)))


def test_fingerprint_tells_conversions_apart(source_checkpoints):
    plan = _plan(source_checkpoints)
    assert plan.fingerprint == _plan(source_checkpoints).fingerprint  # deterministic
    others = [
        _plan(source_checkpoints, checksums=False),
        _plan(source_checkpoints, array_size=2),
        _plan(source_checkpoints, "mindie"),
        plan.with_checksums(False),
    ]
    assert len({plan.fingerprint, *(p.fingerprint for p in others[:3])}) == 4
    assert others[3].fingerprint == others[0].fingerprint  # with_checksums gives the plan made without them


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["shards"][0].update(name="../escape.safetensors"), "not a plain file name"),
        (lambda d: d["files"].append("/etc/passwd"), "not a plain file name"),
        (lambda d: d["extra_files"].append("../../etc/passwd"), "not a path inside the directory"),
        (lambda d: d.pop("shards"), "KeyError"),
        (lambda d: d["shards"][0]["modules"][0].pop(), "ValueError"),
        (lambda d: d.update(plan_format="something else"), "plan_format"),
        (lambda d: d.update(layouts=["nope"]), "unknown source layout 'nope'"),
        (lambda d: d.update(target="nope"), "--target nope"),
    ],
)
def test_a_bad_plan_is_one_line_naming_its_file(source_checkpoints, edit, message):
    data = json.loads(json.dumps(_plan(source_checkpoints).to_json()))
    edit(data)
    with pytest.raises(BadInputError, match=re.escape(message)) as caught:
        ConversionPlan.from_json(data, "/out/.w4a8conv/job.json")
    assert caught.value.message.startswith("/out/.w4a8conv/job.json: ") and "\n" not in caught.value.message


def test_a_saved_plan_carries_its_fingerprint_and_any_edit_shows(source_checkpoints):
    plan = _plan(source_checkpoints)
    raw = plan.to_bytes()
    assert fingerprint_of(raw[:200]) == plan.fingerprint == hashlib.sha256(json_canonical(plan)).hexdigest()
    assert ConversionPlan.from_bytes(raw, "job.json").fingerprint == plan.fingerprint
    edited = raw.replace(b'"file_size":', b'"file_size":1', 1)
    with pytest.raises(BadInputError, match=r"job\.json: its fingerprint does not match its content"):
        ConversionPlan.from_bytes(edited, "job.json")
    for broken in (b"", b"{}", raw[:-1], b'{"fingerprint":"' + b"z" * 64 + raw[80:]):
        with pytest.raises(BadInputError, match=r"job\.json: "):
            ConversionPlan.from_bytes(broken, "job.json")


def json_canonical(plan: ConversionPlan) -> bytes:
    return json.dumps(plan.to_json(), separators=(",", ":")).encode()


def test_job_file_is_the_plan_of_the_conversion(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    convert_checkpoint(src, tmp_path / "out", array_size=2, array_index=1, target=LEGACY_TARGET)
    saved = read_plan(tmp_path / "out" / STATE_DIR / JOB_FILE)
    assert saved.fingerprint == build_plan(open_checkpoint(src), LEGACY_TARGET, array_size=2).fingerprint
    assert cli("convert", "--in", src, "--out", tmp_path / "out", "--array-size", "2", "--array-index", "0")[0] == 0
    assert cli("finalize", tmp_path / "out")[0] == 0


def test_resume_refuses_when_the_source_planned_differently(source_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-group"], src)
    out = tmp_path / "out"
    convert_checkpoint(src, out, array_size=2, array_index=0, target=LEGACY_TARGET)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float16"  # the Linear scales would be rounded differently
    (src / "config.json").write_text(json.dumps(config))
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "1")
    assert code == 2 and f"{src / 'config.json'}: changed since the conversion into --out {out} started" in stderr


def test_relative_paths_convert_resume_and_verify(source_checkpoints, tmp_path, monkeypatch):
    shutil.copytree(source_checkpoints["mindie"], tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    assert cli("convert", "--in", "src", "--out", "out", "--array-size", "2", "--array-index", "0")[0] == 0
    code, _, stderr = cli("convert", "--in", "src", "--out", "out", "--array-size", "2", "--array-index", "1")
    assert code == 0, stderr
    assert runner.invoke(app, ["finalize", "out"]).exit_code == 0
    # finished: the same output whatever the array's size, so a single run resumes it as done
    assert cli("convert", "--in", "src", "--out", "out", "--resume")[0] == 0
    assert runner.invoke(app, ["verify", "src", "out"]).exit_code == 0


def test_dry_run_reports_the_plan(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    args = ("--dry-run", "--json", "--array-size", "2", "--array-index", "0")
    _, stdout, _ = cli("convert", "--in", src, "--out", tmp_path / "out", *args)
    report = json.loads(stdout)
    plan = build_plan(open_checkpoint(src), LEGACY_TARGET, array_size=2)
    assert report["share_shards"] == list(plan.shares[0])
    assert report["share_output_bytes"] == sum(plan.shard(name).file_size for name in plan.shares[0])
    assert report["shards"] == len(plan.shards)
    assert report["target"] == plan.target and report["modules"] == len(plan.modules)
    assert not (tmp_path / "out").exists()


def test_an_unfinished_output_of_an_earlier_version_is_refused_by_name(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / JOB_FILE).write_text(json.dumps({"tool_version": "0.1.0", "array_size": 1}))
    result = runner.invoke(app, ["convert", "--in", str(src), "--out", str(out), "--resume", "--target", LEGACY_TARGET])
    assert result.exit_code == 2
    assert f"{out / STATE_DIR / JOB_FILE}: not a conversion plan of this w4a8conv" in result.output


@pytest.mark.parametrize("edit", ["data", "header"])
def test_a_source_shard_changed_between_jobs_is_named_not_mixed(source_checkpoints, tmp_path, edit):
    """An in-place edit of tensor data (same size, same header) or a re-written shard: the jobs still to
    run would mix new bytes with the shards converted from the old ones."""
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-group"], src)
    out = tmp_path / "out"
    convert_checkpoint(src, out, array_size=2, array_index=0, target=LEGACY_TARGET)
    shard = sorted(src.glob("*-00002-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if edit == "data":
        data[-1] ^= 1  # the last tensor's last byte; the header is untouched
        with open(shard, "r+b") as f:
            f.seek(len(data) - 1)
            f.write(data[-1:])
    else:
        shard.unlink()  # a re-download: a new file under the same name
        shard.write_bytes(bytes(data))
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "1")
    assert code == 2 and stderr.startswith(f"error: {shard}: changed since the conversion into --out {out} started")
    assert not (out / "quant_model_description.json").exists()


@pytest.mark.parametrize("saved", ["garbage\n", "", "0" * 63 + "\n"])
def test_a_damaged_saved_checksum_is_recomputed_not_trusted(source_checkpoints, tmp_path, saved):
    src = source_checkpoints["mindie"]
    out = tmp_path / "out"
    for index in (0, 1):
        convert_checkpoint(src, out, array_size=2, array_index=index, target=LEGACY_TARGET)
    sums = sorted((out / STATE_DIR / "sums").iterdir())
    assert sums
    sums[0].write_text(saved)
    assert cli("finalize", out)[0] == 0
    for line in (out / "w4a8conv.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_the_engine_keys_of_a_deepseek_sized_description_take_linear_time():
    """The canary's engine keys were computed by scanning the whole description once per key: for
    DeepSeek-R1's 223,242 entries `inspect` ran for over 20 minutes. 20,000 entries: 0.01 s linear,
    about a minute quadratic."""
    import time

    from w4a8conv.formats.canary import engine_description

    description = {f"model.layers.{i // 400}.mlp.experts.{i % 400}.weight": "W4A8_DYNAMIC" for i in range(20_000)}
    description |= {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "metadata": {}}
    started = time.perf_counter()
    keys = engine_description(description, 256)
    assert time.perf_counter() - started < 2
    assert keys == {"group_size": 256, "model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0"}
