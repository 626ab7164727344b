"""What a first-time user meets: the README's first conversion as written, the target to pass, one JSON shape
per name in a dry run and a run, and verify's one-line verdicts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from w4a8conv.cli import app

from .conftest import cli

ROOT = Path(__file__).resolve().parent.parent


def readme_conversion() -> list[list[str]]:
    """The commands of the README's first code block under "A conversion", as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A conversion") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)[1]
    return [shlex.split(line.split(" #")[0]) for line in block.splitlines() if line.strip()]


def test_the_readme_s_first_conversion_runs_as_written(tmp_path):
    commands = readme_conversion()
    assert [c[:2] for c in commands] == [["w4a8conv", "synthetic"], ["w4a8conv", "convert"], ["w4a8conv", "verify"]]
    runner = CliRunner()
    for command in commands:  # as written, /tmp moved into the test's directory
        args = [str(tmp_path / a.removeprefix("/tmp/")) if a.startswith("/tmp/") else a for a in command[1:]]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.stderr)
    assert "verified:" in result.stdout


def test_synthetic_writes_what_msmodelslim_writes_today_by_default(tmp_path):
    assert cli("synthetic", tmp_path / "ds")[0] == 0
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "ds"), "--json"])  # the default target
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["format"] == "v1.0.0-per-channel"
    assert report["convert_with"] == "vllm-ascend-0.25"


def test_inspect_names_the_target_to_pass(source_checkpoints):
    runner = CliRunner()
    for layout, expected in (("mindie", "vllm-ascend-0.23"), ("v1.0.0-per-channel", "vllm-ascend-0.25")):
        for target in ([], ["--target", "vllm-ascend-0.25"], ["--target", "vllm-ascend-0.23"]):
            result = runner.invoke(app, ["inspect", str(source_checkpoints[layout]), "--json", *target])
            want = target[1] if target and not (layout == "mindie" and target[1].endswith("0.25")) else expected
            assert json.loads(result.stdout)["convert_with"] == want, (layout, target)
    result = runner.invoke(app, ["inspect", str(source_checkpoints["mindie"])])
    assert re.search(r"convert with +│ --target vllm-ascend-0.23", result.stdout)


def test_a_dry_run_and_a_run_give_each_name_one_shape(source_checkpoints, tmp_path):
    src = source_checkpoints["v1.0.0-per-channel"]
    dry = json.loads(cli("convert", "--in", src, "--out", tmp_path / "out", "--dry-run", "--json")[1])
    run = json.loads(cli("convert", "--in", src, "--out", tmp_path / "out", "--json")[1])
    shared = sorted(set(dry) & set(run))
    assert {"share_shards", "shards", "modules", "output_bytes", "target", "out_dir"} <= set(shared)
    for key in shared:
        assert type(dry[key]) is type(run[key]), key
    assert dry["share_shards"] == run["share_shards"] and isinstance(dry["share_shards"], list)
    for key in ("input_bytes", "output_bytes", "shards", "modules", "target"):
        assert dry[key] == run[key], key


def test_verify_quiet_prints_its_failing_verdict(source_checkpoints, tmp_path):
    src = source_checkpoints["v1.0.0-per-channel"]
    out = tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out, "--no-checksums")[0] == 0
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, stdout, stderr = cli("verify", src, out, "-q")
    assert code == 1 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: verification failed, 1 problem; first: ")


def test_verify_sample_counts_the_files_it_hashed(source_checkpoints, converted_checkpoints):
    src, out = source_checkpoints["v1.0.0-per-channel"], converted_checkpoints["v1.0.0-per-channel"]
    code, stdout, _ = cli("verify", src, out, "--sample", "0.01")
    assert code == 0 and ", 1 file hashed" in stdout
    report = json.loads(cli("verify", src, out, "--sample", "0.01", "--json")[1])
    assert report["files_hashed"] == 1
