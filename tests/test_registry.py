"""Sources and targets are plug-ins: the registries drive planning, conversion, verify and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.errors import BadInputError
from w4a8conv.formats import sources, targets
from w4a8conv.formats.packing import pack_int4_to_int32
from w4a8conv.formats.sources import SOURCE_NAMES, get_source
from w4a8conv.formats.sources.mindie import MindieLayout
from w4a8conv.formats.targets import DEFAULT_TARGET, TARGET_NAMES, get_target
from w4a8conv.formats.targets.vllm_ascend_023 import VllmAscend023
from w4a8conv.names import DESCRIPTION_FILE, TOOL_SECTION
from w4a8conv.planning.planner import build_plan
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.safetensors_io import read_tensor
from w4a8conv.synthetic import w4a8_truth
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET, SPEC

runner = CliRunner()


def test_each_synthetic_checkpoint_is_detected_as_its_layout(source_checkpoints, layout):
    plan = build_plan(open_checkpoint(source_checkpoints[layout]), LEGACY_TARGET)
    assert plan.source_layout == layout and not plan.problems
    assert {m.layout.name for m in plan.modules} == {layout}


def test_each_oracle_reads_what_its_layout_wrote_and_agrees_with_the_converter(source_checkpoints, layout):
    """The numpy oracle and the torch math are independent; on every module they must agree."""
    plan = build_plan(open_checkpoint(source_checkpoints[layout]), LEGACY_TARGET)
    truth = w4a8_truth(SPEC, layout)
    oracle = get_source(layout).oracle
    for module in plan.modules:
        weight = read_tensor(module.sources["weight"])
        raw = weight.numpy()
        values = oracle.int4_values(raw, module.out_features)
        assert np.array_equal(values, truth[module.prefix].values.numpy()), module.prefix
        words = module.layout.operator_words(weight, module.where("weight"), pack_int4_to_int32)
        assert np.array_equal(oracle.operator_words(raw, module.out_features), words.numpy().view(np.uint32).T)


def test_unknown_names_are_bad_input():
    with pytest.raises(BadInputError, match="unknown source layout 'nope'"):
        get_source("nope")
    with pytest.raises(BadInputError, match=re.escape("--target nope: choose one of vllm-ascend-0.23")):
        get_target("nope")
    assert TARGET_NAMES[-1] == DEFAULT_TARGET


def test_the_cli_offers_what_the_registries_hold(source_checkpoints, tmp_path):
    def shown(command: str, option: str) -> str:  # what --help shows for the option's value
        params = typer.main.get_command(app).commands[command].params
        return next(p.metavar for p in params if option in p.opts)

    assert shown("synthetic", "--layout") == "[" + "|".join(SOURCE_NAMES) + "]"
    assert shown("convert", "--target") == shown("inspect", "--target") == "[" + "|".join(TARGET_NAMES) + "]"
    assert shown("convert", "--device") == "[auto|cpu|cuda|npu]"
    assert "mindie|v1" in runner.invoke(app, ["synthetic", "--help"]).output
    result = runner.invoke(
        app, ["convert", "--in", str(source_checkpoints["mindie"]), "--out", str(tmp_path / "o"), "--target", "nope"]
    )
    assert result.exit_code == 2 and "--target nope: choose one of" in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["synthetic", str(tmp_path / "s"), "--layout", "nope"])
    assert result.exit_code == 2 and "--layout nope: choose one of" in result.output


class _ToyTarget(VllmAscend023):
    """vllm-ascend 0.23's tensors under another name, with the scale_bias chunks summed per row."""

    name = "toy-target"

    def outputs(self, projection):
        entries = super().outputs(projection)
        return [*entries[:-1], type(entries[-1])(entries[-1].name, "F32", (projection.out_features,))]

    def process(self, projection, tensors, params_dtype, pack_int4):
        out = super().process(projection, tensors, params_dtype, pack_int4)
        bias = f"{projection.prefix}.scale_bias"
        return {**out, bias: out[bias].sum(-1)}

    def section(self):
        return {"target": "a toy", "scale_bias": "float32 [out]"}


def test_a_target_is_one_class_and_one_registry_line(source_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(targets.TARGETS, _ToyTarget.name, _ToyTarget())
    src = source_checkpoints["v1.0.0-per-group"]
    convert_checkpoint(src, tmp_path / "toy", target="toy-target")
    description = json.loads((tmp_path / "toy" / DESCRIPTION_FILE).read_text())
    assert description[TOOL_SECTION]["target"] == "a toy"
    module = build_plan(open_checkpoint(src)).modules[0]
    prefix = module.prefix
    index = json.loads(next((tmp_path / "toy").glob("*.index.json")).read_text())
    shard = index["weight_map"][f"{prefix}.scale_bias"]
    with safe_open(str(tmp_path / "toy" / shard), "pt") as f:
        assert f.get_tensor(f"{prefix}.scale_bias").shape == (module.out_features,)


class _RenamedMindie(MindieLayout):
    name = "toy-mindie"


def test_a_source_is_one_class_and_one_registry_line(source_checkpoints, converted_checkpoints, tmp_path, monkeypatch):
    """Registered in mindie's place, the plan, the conversion and verify all find it through the registry;
    a target serves it once its list of layouts names it."""
    monkeypatch.setattr(sources, "SOURCES", {"toy-mindie": _RenamedMindie(), **sources.SOURCES})
    assert build_plan(open_checkpoint(source_checkpoints["mindie"]), LEGACY_TARGET).problems  # no target reads it yet
    monkeypatch.setattr(VllmAscend023, "source_layouts", (*VllmAscend023.source_layouts, "toy-mindie"))
    src = source_checkpoints["mindie"]
    plan = build_plan(open_checkpoint(src), LEGACY_TARGET)
    assert plan.source_layout == "toy-mindie"
    convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET)
    description = json.loads((tmp_path / "out" / DESCRIPTION_FILE).read_text())
    assert description[TOOL_SECTION]["source_layout"] == "toy-mindie"
    report = verify_conversion(src, tmp_path / "out")
    assert report.ok, report.problems
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    mindie = converted_checkpoints["mindie"]
    assert shards and all((tmp_path / "out" / n).read_bytes() == (mindie / n).read_bytes() for n in shards)


class _PerChannelOnly(VllmAscend023):
    name = "per-channel-only"
    source_layouts = ("v1.0.0-per-channel",)


def test_a_target_refuses_a_layout_it_does_not_read_before_writing(source_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(targets.TARGETS, _PerChannelOnly.name, _PerChannelOnly())
    src = source_checkpoints["mindie"]
    result = runner.invoke(app, ["inspect", str(src), "--target", "per-channel-only", "--json"])
    report = json.loads(result.output)
    problems = report["problems"]
    assert report["serving_targets"] == ["vllm-ascend-0.23"]  # inspect says which target can
    assert result.exit_code == 2 and problems
    assert all(
        "per-channel-only: does not read the mindie layout; --target vllm-ascend-0.23 serves it" in p for p in problems
    )
    assert problems[0].startswith(f"{src}/") and ": tensor model.layers." in problems[0]
    args = ["convert", "--in", str(src), "--out", str(tmp_path / "out"), "--target", "per-channel-only"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "per-channel-only: does not read the mindie layout" in result.output
    assert not (tmp_path / "out").exists()
    per_channel = str(source_checkpoints["v1.0.0-per-channel"])
    ok = runner.invoke(app, ["inspect", per_channel, "--target", "per-channel-only", "--json"])
    assert ok.exit_code == 0
    assert json.loads(ok.output)["serving_targets"] == ["vllm-ascend-0.23", "vllm-ascend-0.25", "per-channel-only"]
