"""The serving targets: vllm-ascend 0.23 (every layout, MoE and Linear) and the current line, 0.25.1rc1 and
later as main reads it (per-channel 1.0.0 MoE only), the default."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.formats.targets import DEFAULT_TARGET, TARGET_NAMES
from w4a8conv.names import DESCRIPTION_FILE, MANIFEST_FILE, TOOL_SECTION
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .conftest import cli
from .test_golden import CONTRACT
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
    for key in ("target", "engine_releases", "upstream"):  # the contract names the target
        assert descriptions[0][TOOL_SECTION].pop(key) != descriptions[1][TOOL_SECTION].pop(key)
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
    assert len(report["problems"]) <= 2  # one line per reason, naming the first tensor and counting the rest
    assert any("more W4A8 modules)" in problem for problem in report["problems"])
    assert cli("convert", "--in", src, "--out", tmp_path / "old", "--target", "vllm-ascend-0.23")[0] == 0


def test_without_a_target_the_newest_is_asked_for(tmp_path, source_checkpoints):
    runner = CliRunner()
    src = str(source_checkpoints["mindie"])
    default = runner.invoke(app, ["convert", "--in", src, "--out", str(tmp_path / "out")])
    explicit = runner.invoke(app, ["convert", "--in", src, "--out", str(tmp_path / "out"), "--target", CURRENT])
    assert default.exit_code == explicit.exit_code == 2 and default.stderr == explicit.stderr
    assert convert_checkpoint(source_checkpoints["v1.0.0-per-channel"], tmp_path / "pc").target == CURRENT


def _edit_section(out, **changes) -> None:
    path = out / DESCRIPTION_FILE
    description = json.loads(path.read_text())
    description[TOOL_SECTION].update(changes)
    path.write_text(json.dumps(description, indent=2) + "\n")


def test_an_output_records_its_contract_and_inspect_shows_it(converted_checkpoints):
    code, stdout, _ = cli("inspect", converted_checkpoints["mindie"], "--json")
    contract = json.loads(stdout)["contract"]
    canary = contract.pop("canary")
    assert code == 0 and contract == {**CONTRACT, "source_layout": "mindie", "params_dtype": "bfloat16"}
    description = json.loads((converted_checkpoints["mindie"] / DESCRIPTION_FILE).read_text())
    digest = description[TOOL_SECTION]["canary"]["sha256"]
    assert canary == (
        f"w4a8conv.canary: expert 0 of model.layers.1.mlp.experts, Linear model.layers.0.self_attn.o_proj "
        f"(sha256 {digest[:16]}...)"
    )


def test_readers_refuse_a_format_they_do_not_know_and_read_format_1(tmp_path, source_checkpoints):
    from w4a8conv.errors import BadInputError
    from w4a8conv.serving.runtime import ProcessedCheckpoint

    out = convert_checkpoint(source_checkpoints["mindie"], tmp_path / "out", target="vllm-ascend-0.23").out_dir
    _edit_section(out, format_version=3)
    with pytest.raises(
        BadInputError, match=r"format_version 3, this w4a8conv reads 1, 2: use the w4a8conv that wrote it"
    ):
        ProcessedCheckpoint(out)
    _edit_section(out, format_version=1, target="vllm-ascend 0.23 process_weights_after_loading")
    assert ProcessedCheckpoint(out).target is None  # format 1 named no target, and its tensors are format 2's


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"engine_releases": ">=0.1"}, "w4a8conv.engine_releases is '>=0.1', expected '>=0.9.0,<0.27'"),
        ({"target": "vllm-ascend-9"}, "w4a8conv.target is 'vllm-ascend-9', none of vllm-ascend-0.23, vllm-ascend-0.25"),
        ({"target": CURRENT}, f"w4a8conv.target {CURRENT} does not serve a mindie source"),
        ({"scale_bias_chunks": 8}, "w4a8conv.scale_bias_chunks is 8, expected 16"),
    ],
)
def test_verify_checks_the_contract(tmp_path, source_checkpoints, changes, problem):
    src = source_checkpoints["mindie"]
    out = convert_checkpoint(src, tmp_path / "out", target="vllm-ascend-0.23", checksums=False).out_dir
    assert verify_conversion(src, out).ok
    _edit_section(out, **changes)
    report = verify_conversion(src, out)
    assert not report.ok and any(problem in p for p in report.problems), report.problems
