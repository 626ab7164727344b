"""``w4a8conv check-engine`` on the real vLLM 0.23.0 and vllm-ascend 0.23.0 code: its verdict for every layout
``test_real_engine`` serves equals what loading through the plugin gives there, an engine changed in one
line is refused, and a DeepSeek-shaped output is checked at every default layout in under 10 s."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner
from vllm_ascend.quantization.methods import registry, w4a8

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import DESCRIPTION_FILE, PREPACKED_TYPE
from w4a8conv.serving import vllm_plugin
from w4a8conv.serving.vllm_plugin import canary_check as canary
from w4a8conv.serving.vllm_plugin.check_engine import DEFAULT_LAYOUTS, Layout, check_engine
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from . import harness
from .harness import Serving
from .test_real_engine import LAYOUTS, MODES, SPEC, layout_checkpoints, serve


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """test_real_engine's outputs, converted for vllm-ascend-0.23, by source layout."""
    return {layout: out for layout, (_, out) in layout_checkpoints(tmp_path_factory).items()}


def load_time_verdict(out, mode: str, size: int, rank: int) -> str | None:
    """What serving ``out`` through the plugin gives at this layout and rank: None, or its refusal."""
    canary.forget()
    Serving.expert_parallel, Serving.dynamic_eplb = mode in ("ep", "eplb"), mode == "eplb"
    experts = list(range(rank, SPEC.experts, size)) if Serving.expert_parallel else list(range(SPEC.experts))
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    try:
        with harness.serving():
            serve(out, processed, registry.get_scheme_class(PREPACKED_TYPE, "moe"), experts, size, rank)
        return None
    except ValueError as refusal:
        return str(refusal)
    finally:
        canary.forget()
        Serving.expert_parallel = Serving.dynamic_eplb = False


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("mode", "size"), MODES, ids=[f"{m}{n}" for m, n in MODES])
def test_check_engine_agrees_with_the_plugin_s_load_time_verdict(outputs, layout, mode, size):
    out = outputs[layout]
    vllm_plugin.register()
    asked = Layout(size, expert_parallel=mode in ("ep", "eplb"), dynamic_eplb=mode == "eplb")
    for rank in sorted({0, size - 1}):
        expected = load_time_verdict(out, mode, size, rank)
        _, (verdict,) = check_engine(out, (asked,), rank)
        assert verdict.serves == (expected is None), (verdict, expected)
        assert verdict.reason == expected
        assert verdict.checked == ([] if expected else ["MoE expert model.layers.0.mlp.experts.0"])


def test_an_engine_changed_in_one_line_is_refused_at_every_layout(outputs, monkeypatch):
    original = w4a8.AscendW4A8DynamicFusedMoEMethod.process_weights_after_loading

    def changed(self, layer):
        original(self, layer)
        layer.w2_scale_bias.data = layer.w2_scale_bias.data * (1 + 2**-20)

    monkeypatch.setattr(w4a8.AscendW4A8DynamicFusedMoEMethod, "process_weights_after_loading", changed)
    result = CliRunner().invoke(app, ["check-engine", str(outputs["v1.0.0-per-channel"]), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["ok"] and report["engine"] == vllm_plugin.detect_api().version
    assert len(report["layouts"]) == 2 * len(DEFAULT_LAYOUTS) - 1  # MoE tp 1 has one rank
    for verdict, layout in zip(report["layouts"], [v for v in DEFAULT_LAYOUTS for _ in {0, v.size - 1}], strict=True):
        assert not verdict["serves"] and verdict["layout"] == layout.label
        if not harness.refused_at(layout.moe_tp):
            assert "computes w2_scale_bias of the canary MoE expert" in verdict["reason"]
    monkeypatch.setattr(w4a8.AscendW4A8DynamicFusedMoEMethod, "process_weights_after_loading", original)
    result = CliRunner().invoke(app, ["check-engine", str(outputs["v1.0.0-per-channel"])])
    assert result.exit_code == (1 if harness.BIASES_COPIED_WHOLE else 0), result.stdout
    assert result.stdout.splitlines()[0].startswith("serves   MoE tp 1, rank 0: bit-identical (MoE expert ")


def test_one_layout_and_rank_as_asked(outputs):
    result = CliRunner().invoke(
        app, ["check-engine", str(outputs["v1.0.0-per-group"]), "--tp", "4", "--rank", "2", "--json"]
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and [(v["layout"], v["rank"]) for v in report["layouts"]] == [("MoE tp 4", 2)]
    if harness.PER_CHANNEL_ONLY:
        assert re.search(harness.PER_GROUP_REFUSAL, report["layouts"][0]["reason"])
    elif not harness.refused_at(4):
        assert "unloaded" in report["layouts"][0]["reason"]  # stock serves uninitialised w2 scales there
    result = CliRunner().invoke(app, ["check-engine", str(outputs["v1.0.0-per-channel"]), "--expert-parallel"])
    assert result.exit_code == 0 and "expert parallel 16, rank 15: bit-identical" in result.stdout
    result = CliRunner().invoke(app, ["check-engine", str(outputs["mindie"]), "--tp", "2", "--rank", "2"])
    assert result.exit_code == 2 and "--rank 2: need 0 <= rank < 2" in result.stderr


def test_a_deepseek_shaped_output_is_checked_at_every_default_layout_in_under_10_s(tmp_path):
    spec = SyntheticSpec(
        hidden=7168, intermediate=2048, experts=2, dense_layers=0, moe_layers=1, group_size=256, w4a8_linear=False
    )
    src = write_checkpoint(tmp_path / "ds", "v1.0.0-per-channel", spec)
    out = convert_checkpoint(src, tmp_path / "out", target="vllm-ascend-0.23").out_dir
    started = time.monotonic()
    _, verdicts = check_engine(out)
    seconds = time.monotonic() - started
    assert len(verdicts) == 2 * len(DEFAULT_LAYOUTS) - 1
    layouts = [layout for layout in DEFAULT_LAYOUTS for _ in {0, layout.size - 1}]
    assert [v.serves for v in verdicts] == [not harness.refused_at(layout.moe_tp) for layout in layouts]
    assert seconds < 10, f"{seconds:.1f} s"


def test_an_engine_it_cannot_drive_is_one_line(outputs, monkeypatch):
    """A release whose layers ask for more than the sandbox answers: one line naming it, exit 2."""
    from w4a8conv.serving.vllm_plugin import sandbox

    def newer(*args, **kwargs):
        raise AttributeError("'FusedMoE' object has no attribute 'moe_runner'")

    monkeypatch.setattr(sandbox, "loader_only_fused_moe", newer)
    result = CliRunner().invoke(app, ["check-engine", str(outputs["v1.0.0-per-channel"])])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    version = vllm_plugin.detect_api().version
    expected = f"error: check-engine: cannot drive vllm-ascend {version} here (MoE tp 1, rank 0): "
    assert result.stderr.startswith(expected)


def test_the_check_runs_on_the_npu_torch_npu_sees_and_lets_the_engine_decide_nz_there(monkeypatch):
    """Where torch_npu reports a device the layers are made on it and the engine decides NZ itself (its own
    _should_trans_nz, whose answer the storage formats then show); a torch_npu without CANN's runtime, or
    none, is the CPU, where the sandbox answers NZ as an A2/A3 device would."""
    import torch
    import vllm_ascend.utils

    from w4a8conv.serving.vllm_plugin import sandbox
    from w4a8conv.serving.vllm_plugin.check_engine import serving_device

    monkeypatch.setattr(torch, "npu", SimpleNamespace(is_available=lambda: True, device_count=lambda: 8), raising=False)
    assert serving_device() == "npu"

    def no_runtime():
        raise RuntimeError("libascendcl.so: cannot open shared object file")

    monkeypatch.setattr(torch, "npu", SimpleNamespace(is_available=no_runtime, device_count=lambda: 0), raising=False)
    assert serving_device() == "cpu"
    engine_s_own = vllm_ascend.utils._should_trans_nz
    with sandbox.serving(sandbox.Serving(on_npu=True)):
        assert vllm_ascend.utils._should_trans_nz is engine_s_own
    with sandbox.serving(sandbox.Serving()):
        assert vllm_ascend.utils._should_trans_nz is not engine_s_own
        assert vllm_ascend.utils._should_trans_nz(torch.empty(2, dtype=torch.int8))
    assert vllm_ascend.utils._should_trans_nz is engine_s_own


def test_mega_moe_is_what_the_engine_decides_for_the_server(outputs, monkeypatch):
    """With cann_ops_transformer present and enable_fused_mc2 1, vllm-ascend from the 0.26 branch on builds
    MegaMoE lists only where its own use_cann_megamoe says (an A3 device, expert parallelism...): on this A2
    build it builds none, and the plugin, asking the same function, builds none either, so --mega-moe serves
    (before, the plugin built them and its canary refused). Where the release decides by the flag alone
    (main in 2026-12), both build them, and the lists are equal."""
    import importlib
    import sys

    modules = [importlib.import_module(f"vllm_ascend.{n}") for n in ("ascend_config", "ascend_forward_context")]
    # cann_ops_transformer found: the flag, wherever a module bound it (main's w4a8 imports it by name)
    holders = [
        m for n, m in list(sys.modules.items()) if n.startswith("vllm_ascend") and "_MEGA_MOE_SUPPORTED" in vars(m)
    ]
    if not holders:
        pytest.skip("this vllm-ascend has no MegaMoE")
    for module in holders:
        monkeypatch.setattr(module, "_MEGA_MOE_SUPPORTED", True)
    result = CliRunner().invoke(
        app, ["check-engine", str(outputs["v1.0.0-per-channel"]), "--expert-parallel", "--mega-moe", "--json"]
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 0, report
    engine_decides = hasattr(modules[1], "use_cann_megamoe")
    for verdict in report["layouts"]:
        assert verdict["serves"] and verdict["layout"] == "expert parallel 16, MegaMoE"
        assert (verdict["note"] is not None) == engine_decides
