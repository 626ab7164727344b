"""The serving targets: vllm-ascend 0.23 (every layout, MoE and Linear) and the current line, 0.25.1rc1 and
later as main reads it (per-channel 1.0.0 MoE only), the default."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.convert import convert_checkpoint
from w4a8conv.names import DESCRIPTION_FILE, MANIFEST_FILE, TOOL_SECTION
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.targets import DEFAULT_TARGET, TARGET_NAMES
from w4a8conv.verify import verify_conversion

from .conftest import cli
from .test_parallel import tree_bytes

CURRENT = "vllm-ascend-0.25"
MOE_ONLY = SyntheticSpec(w4a8_linear=False)


def test_the_current_line_is_the_default():
    assert DEFAULT_TARGET == CURRENT == TARGET_NAMES[-1]


def test_per_channel_moe_converts_for_the_current_line_as_for_0_23(tmp_path, source_checkpoints, converted_checkpoints):
    """main's per-channel processing is 0.23's: the same tensors, only the description names the target."""
    src = source_checkpoints["v1.0.0-per-channel"]
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--target", CURRENT)
    assert code == 0, stderr
    new, old = tree_bytes(tmp_path / "out"), tree_bytes(converted_checkpoints["v1.0.0-per-channel"])
    descriptions = [json.loads(tree.pop(DESCRIPTION_FILE)) for tree in (new, old)]
    for tree in (new, old):
        tree.pop(MANIFEST_FILE)
    assert new == old  # shards, index, copied files
    assert descriptions[0][TOOL_SECTION].pop("target") != descriptions[1][TOOL_SECTION].pop("target")
    assert descriptions[0] == descriptions[1]
    assert verify_conversion(src, tmp_path / "out").ok


@pytest.mark.parametrize(
    ("layout", "spec", "reason"),
    [
        ("mindie", MOE_ONLY, "reads only 1.0.0 weights (two int4 per byte), not mindie's one per byte"),
        ("v1.0.0-per-group", MOE_ONLY, "refuses per-group W4A8 MoE weights ('no longer supported')"),
        ("v1.0.0-per-group", SyntheticSpec(), "has no W4A8_DYNAMIC Linear (removed after the 0.26 branch)"),
    ],
)
def test_the_current_line_refuses_what_main_cannot_serve_before_writing(tmp_path, layout, spec, reason):
    src = write_checkpoint(tmp_path / "src", layout, spec)
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--target", CURRENT)
    assert code == 2 and not (tmp_path / "out").exists()
    assert "tensor model.layers." in stderr and f"{CURRENT}: vllm-ascend main {reason}" in stderr
    assert "--target vllm-ascend-0.23 serves it" in stderr
    code, stdout, _ = cli("inspect", src, "--target", CURRENT, "--json")
    report = json.loads(stdout)
    assert code == 2 and report["serving_targets"] == ["vllm-ascend-0.23"]
    assert any(reason in problem for problem in report["problems"])
    assert cli("convert", "--in", src, "--out", tmp_path / "old", "--target", "vllm-ascend-0.23")[0] == 0


def test_without_a_target_the_newest_is_asked_for(tmp_path, source_checkpoints):
    runner = CliRunner()
    src = str(source_checkpoints["mindie"])
    default = runner.invoke(app, ["convert", "--in", src, "--out", str(tmp_path / "out")])
    explicit = runner.invoke(app, ["convert", "--in", src, "--out", str(tmp_path / "out"), "--target", CURRENT])
    assert default.exit_code == explicit.exit_code == 2 and default.stderr == explicit.stderr
    assert convert_checkpoint(source_checkpoints["v1.0.0-per-channel"], tmp_path / "pc").target == CURRENT
