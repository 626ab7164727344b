"""``w4a8conv inspect``: layout detection from shapes and dtypes, and its JSON contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.formats.sources import get_source
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from .conftest import LEGACY_TARGET, SPEC, cli

runner = CliRunner()
KEYS = {"format", "group_size", "modules", "moe_layers", "shards", "input_bytes", "problems"}


def inspect_json(path) -> tuple[int, dict]:
    result = runner.invoke(app, ["inspect", str(path), "--json", "--target", LEGACY_TARGET])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize(
    "layout_name,group_size,modules",
    [("mindie", 32, 30), ("v1.0.0-per-group", 32, 30), ("v1.0.0-per-channel", 0, 24)],
)
def test_detects_each_layout(source_checkpoints, layout_name, group_size, modules):
    code, report = inspect_json(source_checkpoints[layout_name])
    assert code == 0
    assert report.keys() >= KEYS
    assert report["format"] == layout_name
    assert report["group_size"] == group_size
    assert report["modules"] == modules  # 2 MoE layers x 4 experts x 3, plus 6 Linear when per-group
    assert report["moe_layers"] == SPEC.moe_layers and report["experts"] == SPEC.moe_layers * SPEC.experts
    assert (report["hidden_size"], report["moe_intermediate_size"]) == (SPEC.hidden, SPEC.intermediate)
    assert report["shards"] == 4
    assert report["input_bytes"] == sum(p.stat().st_size for p in source_checkpoints[layout_name].glob("*.safetensors"))
    assert report["other_quant_types"]["W8A8_DYNAMIC"] > 0 and report["other_quant_types"]["FLOAT"] > 0
    assert report["problems"] == []


def test_mindie_detected_without_version_or_group_size(source_checkpoints):
    description = json.loads((source_checkpoints["mindie"] / "quant_model_description.json").read_text())
    assert "version" not in description and "group_size" not in description
    assert inspect_json(source_checkpoints["mindie"])[1]["group_size"] == SPEC.group_size  # from the shapes


def test_detects_packed_weights_despite_missing_version(tmp_path):
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-group", SyntheticSpec(w4a8_linear=False))
    path = src / "quant_model_description.json"
    description = json.loads(path.read_text())
    del description["version"]
    path.write_text(json.dumps(description))
    code, report = inspect_json(src)
    assert code == 2
    assert report["format"] == "v1.0.0-per-group"  # shapes, not the version, decide
    assert any("packed two int4 per byte" in p for p in report["problems"])


def test_lists_every_problem(tmp_path):
    src = write_checkpoint(tmp_path / "src", "mindie", SyntheticSpec(w4a8_linear=False))
    path = src / "quant_model_description.json"
    description = json.loads(path.read_text())
    description["model.layers.7.mlp.experts.0.gate_proj.weight"] = "W4A8_DYNAMIC"
    description["model.layers.8.mlp.experts.0.gate_proj.weight"] = "W4A8_DYNAMIC"
    path.write_text(json.dumps(description))
    code, report = inspect_json(src)
    assert code == 2 and len(report["problems"]) == 2


def test_processed_output_is_recognised(converted_checkpoints, layout):
    code, report = inspect_json(converted_checkpoints[layout])
    assert code == 0 and report["format"] == "processed"
    assert report["modules"] == (30 if get_source(layout).synthetic_linear else 24)
    assert report["moe_layers"] == SPEC.moe_layers


def test_human_table(source_checkpoints):
    result = runner.invoke(app, ["inspect", str(source_checkpoints["mindie"]), "--target", LEGACY_TARGET])
    assert result.exit_code == 0
    assert "mindie" in result.stdout and "no problems found" in result.stdout


def test_synthetic_checkpoint_writes_its_description_last(tmp_path, monkeypatch):
    """Cached bench checkpoints count as complete once they have a description: it must come last."""
    written: list[str] = []
    write_text = Path.write_text

    def recording(self, *args, **kwargs):
        written.append(self.name)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", recording)
    write_checkpoint(tmp_path / "ckpt", "mindie")
    assert written[-1] == "quant_model_description.json" and "config.json" in written


@pytest.mark.parametrize("layout_name", ["mindie", "v1.0.0-per-group"])
def test_a_valid_checkpoint_the_default_target_cannot_serve_is_no_problem(source_checkpoints, layout_name):
    """inspect answers "what is this, and who can serve it": exit 0 and the target that serves it; exit 2
    only when the --target asked for cannot."""
    result = CliRunner().invoke(app, ["inspect", str(source_checkpoints[layout_name]), "--json"])  # no --target
    code, report = result.exit_code, json.loads(result.stdout)
    assert code == 0 and report["ok"] and report["target"] == "vllm-ascend-0.23"
    assert report["notes"] == [
        "the default target vllm-ascend-0.25 does not serve it: convert with --target vllm-ascend-0.23"
    ]
    code, stdout, _ = cli("inspect", source_checkpoints[layout_name], "--target", "vllm-ascend-0.25")
    assert code == 2 and "vllm-ascend-0.25: " in stdout


def test_inspect_an_output_for_another_target_says_so(converted_checkpoints):
    out = converted_checkpoints["mindie"]  # made for vllm-ascend-0.23
    assert cli("inspect", out, "--target", "vllm-ascend-0.23")[0] == 0
    code, stdout, _ = cli("inspect", out, "--target", "vllm-ascend-0.25")
    assert code == 2 and "converted for --target vllm-ascend-0.23, not vllm-ascend-0.25" in stdout


def test_inspect_says_which_checks_of_convert_it_did_not_run(source_checkpoints, tmp_path):
    """Headers only: inspect does not read the scales convert refuses (NaN, Inf) and says so."""
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], src)
    code, stdout, _ = cli("inspect", src, "--target", "vllm-ascend-0.25")
    assert code == 0 and "not checked: the W4A8 scales' values (NaN, Inf): `w4a8conv convert --dry-run`" in stdout
    assert json.loads(cli("inspect", src, "--json")[1])["not_checked"]


def test_a_path_with_brackets_is_shown_as_it_is(source_checkpoints, tmp_path):
    src = tmp_path / "model [bf16]"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], src)
    code, stdout, _ = cli("inspect", src)
    assert code == 0 and f"w4a8conv inspect {src}" in stdout
