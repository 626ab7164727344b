"""Every model family msModelSlim writes W4A8 for, in its own tensor names: inspect, convert for both targets,
verify --numeric, the runtime and the plugin (stand-ins), and what passes through untouched (DeepSeek-V4's
dotless ``hc_head_*``, GLM-5's ``rot.weight`` outside the description)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.experts import NAMINGS, describe_naming, parse_expert
from w4a8conv.formats.families import FAMILIES, FAMILY_NAMES
from w4a8conv.names import DESCRIPTION_FILE, PREPACKED_TYPE, W4A8_TYPE
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.serving import vllm_plugin
from w4a8conv.serving.runtime import ProcessedCheckpoint
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from . import stand_ins
from .conftest import cli
from .upstream_reference import UpstreamReference

LAYOUT = "v1.0.0-per-channel"  # what msModelSlim's current saver writes for every family
TARGETS = ("vllm-ascend-0.23", "vllm-ascend-0.25")
NAMING_WORDS = {
    "deepseek-v3": "gate_proj/up_proj/down_proj, DeepSeek-V3/R1, Kimi-K2, GLM-5 or Qwen3-MoE naming",
    "deepseek-v4": "w1/w2/w3, DeepSeek-V4 naming, MTP layer included",
    "glm-5": "gate_proj/up_proj/down_proj, DeepSeek-V3/R1, Kimi-K2, GLM-5 or Qwen3-MoE naming",
    "qwen3.5-moe": "gate_proj/up_proj/down_proj, Qwen3.5-MoE naming",
    "minimax-m2": "w1/w2/w3, MiniMax-M2/M3 or Kimi-K3 naming",
}
# Each family's first MoE layer, as its checkpoint names it, and the MoE layers msModelSlim makes W4A8
FIRST_MOE_LAYER = {
    "deepseek-v3": "model.layers.1.mlp.experts",
    "deepseek-v4": "layers.0.ffn.experts",
    "glm-5": "model.layers.1.mlp.experts",
    "qwen3.5-moe": "model.language_model.layers.0.mlp.experts",
    "minimax-m2": "model.layers.0.block_sparse_moe.experts",
}
W4A8_MOE_LAYERS = {"deepseek-v3": 2, "deepseek-v4": 3, "glm-5": 2, "qwen3.5-moe": 2, "minimax-m2": 2}


def spec(family: str) -> SyntheticSpec:
    return SyntheticSpec(family=family, dense_layers=min(1, FAMILIES[family].public.dense_layers))


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each family's per-channel source and its conversion for the default target."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILY_NAMES:
        src = write_checkpoint(root / family, LAYOUT, spec(family))
        made[family] = (src, convert_checkpoint(src, root / f"{family}-out").out_dir)
    return made


def test_the_table_names_every_projection_once():
    roles = [naming.name_of(role) for naming in NAMINGS for role in ("gate", "up", "down")]
    assert len(roles) == len(set(roles))
    v4 = parse_expert("mtp.0.ffn.experts.12.w3")
    assert (v4.layer, v4.expert, v4.role, v4.naming.label) == ("mtp.0.ffn.experts", 12, "up", "w1/w2/w3")
    qwen = parse_expert("model.language_model.layers.7.mlp.experts.511.down_proj")
    assert (qwen.layer, qwen.expert, qwen.role) == ("model.language_model.layers.7.mlp.experts", 511, "down")
    assert parse_expert("layers.3.ffn.shared_experts.w1") is None  # a shared expert is no routed expert
    assert parse_expert("model.layers.3.mlp.experts.0.gate") is None


def test_an_mtp_layer_numbered_past_the_decoder_is_named_so():
    naming = NAMINGS[0]
    words = describe_naming(["model.layers.3.mlp.experts", "model.layers.61.mlp.experts"], {naming}, 61)
    assert words.endswith("MTP layer included")
    assert describe_naming(["model.layers.3.mlp.experts"], {naming}, 61).endswith("Qwen3-MoE naming")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_inspect_counts_every_family_s_moe_layers_and_names_its_naming(families, family):
    src, out = families[family]
    code, stdout, _ = cli("inspect", src, "--json", "--target", "vllm-ascend-0.25")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], report["problems"]
    assert report["moe_layers"] == W4A8_MOE_LAYERS[family] and report["w4a8_linear"] == 0
    assert report["experts_naming"] == NAMING_WORDS[family]
    code, stdout, _ = cli("inspect", out, "--json", "--target", "vllm-ascend-0.25")
    assert code == 0 and json.loads(stdout)["experts_naming"] == NAMING_WORDS[family]
    code, stdout, _ = cli("inspect", src, "--target", "vllm-ascend-0.25")
    assert f"experts               │ {NAMING_WORDS[family]}" in stdout


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("target", TARGETS)
def test_every_family_converts_for_both_targets_and_verifies_numerically(tmp_path, families, family, target):
    src, _ = families[family]
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--target", target, "-q")
    assert code == 0, stderr
    code, stdout, stderr = cli("verify", src, tmp_path / "out", "--numeric", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], report["problems"]
    assert report["numeric_checks"] > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_outputs_keep_the_source_s_names(families, family):
    src, out = families[family]
    source = open_checkpoint(src)
    converted = json.loads((out / DESCRIPTION_FILE).read_text())
    w4a8 = {
        n.removesuffix(".weight") for n, t in source.description.items() if t == W4A8_TYPE and n.endswith(".weight")
    }
    prepacked = {n.rsplit(".", 1)[0] for n, t in converted.items() if t == PREPACKED_TYPE}
    assert prepacked == w4a8 and all(parse_expert(p) for p in prepacked)
    assert {p.rsplit(".", 1)[0] for p in prepacked if p.startswith(FIRST_MOE_LAYER[family])}
    # every other description key is the source's, as it was
    for key, value in source.description.items():
        if key not in ("group_size",) and not key.startswith(tuple(p + "." for p in w4a8)):
            assert converted[key] == value, key


def test_deepseek_v4_s_dotless_tensors_and_mtp_experts_come_through(families):
    src, out = families["deepseek-v4"]
    converted = json.loads((out / DESCRIPTION_FILE).read_text())
    for name in FAMILIES["deepseek-v4"].dotless:
        assert converted[name] == "FLOAT"
        assert _tensor_bytes(src, name) == _tensor_bytes(out, name)
    assert converted["mtp.0.ffn.experts.0.w2.weight"] == PREPACKED_TYPE
    assert converted["layers.0.ffn.shared_experts.w2.weight"] == "W8A8_DYNAMIC"
    assert ProcessedCheckpoint(out).experts("mtp.0.ffn.experts") == list(range(4))


def test_glm_5_s_rotation_passes_through_outside_the_description(tmp_path, families):
    src, _ = families["glm-5"]
    out = convert_checkpoint(src, tmp_path / "out", checksums=False).out_dir
    index = json.loads(next(out.glob("*.index.json")).read_text())["weight_map"]
    description = json.loads((out / DESCRIPTION_FILE).read_text())
    assert index["rot.weight"] == "rot.safetensors" and "rot.weight" not in description
    assert description["is_rot_used"] is True
    assert _tensor_bytes(src, "rot.weight") == _tensor_bytes(out, "rot.weight")
    assert cli("verify", src, out)[0] == 0
    # a rotation that differs from the source's is still refused, and so is one the output types
    info = open_checkpoint(out).tensors["rot.weight"]
    with open(info.path, "r+b") as f:
        f.seek(info.begin)
        first = f.read(1)
        f.seek(info.begin)
        f.write(bytes([first[0] ^ 1]))
    code, stdout, _ = cli("verify", src, out, "--json")
    assert code == 1 and any("rot.weight: bytes differ" in p for p in json.loads(stdout)["problems"])
    with open(info.path, "r+b") as f:
        f.seek(info.begin)
        f.write(first)
    (out / DESCRIPTION_FILE).write_text(json.dumps({**description, "rot.weight": "FLOAT"}))
    code, stdout, _ = cli("verify", src, out, "--json")
    assert code == 1 and any("rot.weight" in p for p in json.loads(stdout)["problems"])


@pytest.mark.parametrize("family", ["deepseek-v4", "minimax-m2", "qwen3.5-moe"])
@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 1)])
def test_the_plugin_serves_every_family_as_stock_processing_does(families, family, tp_size, tp_rank):
    """Stand-ins for vllm-ascend (the registry release) and its canary: the canary expert is named as the
    family names it, and the layer the plugin loads equals stock's for the unconverted checkpoint."""
    src, out = families[family]
    naming = FAMILIES[family].naming
    stand_ins.install("registry")
    try:
        vllm_plugin.register()
        from vllm_ascend.quantization.methods.registry import get_scheme_class

        stand_ins.Config.description = json.loads((out / DESCRIPTION_FILE).read_text())
        stand_ins.Config.tp_size, stand_ins.Config.model_path = tp_size, out
        layers = [FIRST_MOE_LAYER[family]] + (["mtp.0.ffn.experts"] if family == "deepseek-v4" else [])
        for prefix in layers:
            ckpt = ProcessedCheckpoint(out)
            experts = ckpt.experts(prefix)
            moe = get_scheme_class(PREPACKED_TYPE, "moe")()
            layer = stand_ins.FusedMoELayer(moe, experts, 128, 64, tp_size, tp_rank)
            layer.load(prefix, ckpt.tensors([n for n in ckpt.weight_map if n.startswith(prefix + ".")]))
            layer.quant_method.process_weights_after_loading(layer)
            names = (naming.gate, naming.up, naming.down)
            expected = UpstreamReference(src).moe(prefix, len(experts), tp_size, tp_rank, names)
            for name, value in expected.items():
                assert torch.equal(getattr(layer, name).data, value), (prefix, name)
            assert torch.equal(
                ckpt.load_moe(prefix)["w2_weight"], UpstreamReference(src).moe(prefix, 4, names=names)["w2_weight"]
            )
    finally:
        stand_ins.uninstall()


def test_mix_placement_is_refused_in_one_line(families):
    """DeepSeek-V4's mix_placement loads the W8A8 shared experts among the W4A8 routed ones, which stock
    vllm-ascend 0.23 cannot load (tests/engine/test_families_engine.py): the plugin refuses it up front."""
    _, out = families["deepseek-v4"]
    stand_ins.install("registry")
    try:
        vllm_plugin.register()
        from vllm_ascend.quantization.methods.registry import get_scheme_class

        stand_ins.Config.description = json.loads((out / DESCRIPTION_FILE).read_text())
        stand_ins.Config.model_path, stand_ins.Config.mix_placement = out, True
        with pytest.raises(ValueError, match=r"^w4a8conv: mix_placement is on, .*; serve without mix_placement$"):
            get_scheme_class(PREPACKED_TYPE, "moe")()
    finally:
        stand_ins.Config.mix_placement = False
        stand_ins.uninstall()


def test_synthetic_family_option_is_checked(tmp_path):
    code, _, stderr = cli("synthetic", tmp_path / "x", "--family", "llama")
    assert code == 2 and "--family llama: choose one of deepseek-v3, deepseek-v4" in stderr
    code, _, stderr = cli("synthetic", tmp_path / "y", "--family", "deepseek-v4", "--layout", "compressed-tensors")
    assert code == 2 and "written for deepseek-v3 only" in stderr


def test_size_gb_takes_the_family_s_public_shapes(tmp_path):
    code, _, stderr = cli("synthetic", tmp_path / "v4", "--family", "deepseek-v4", "--size-gb", "0.3", "-q")
    assert code == 0, stderr
    config = json.loads((tmp_path / "v4" / "config.json").read_text())
    assert (config["hidden_size"], config["moe_intermediate_size"], config["model_type"]) == (4096, 2048, "deepseek_v4")
    assert config["first_k_dense_replace"] == 0


def _tensor_bytes(path: Path, name: str) -> bytes:
    info = open_checkpoint(path).tensors[name]
    with safe_open(str(info.path), "pt") as f:
        return f.get_tensor(name).numpy().tobytes()


def test_a_layer_whose_experts_mix_namings_is_a_problem(tmp_path, families):
    """One expert renamed w1/w3/w2 among gate_proj/up_proj/down_proj ones: inspect says so, convert refuses."""
    src = tmp_path / "mixed"
    shutil.copytree(families["deepseek-v3"][0], src)
    ckpt = open_checkpoint(src)
    old = "model.layers.1.mlp.experts.0."
    renames = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    index_path = next(src.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    description = json.loads((src / DESCRIPTION_FILE).read_text())
    for shard in {info.path for name, info in ckpt.tensors.items() if name.startswith(old)}:
        tensors = load_file(shard)
        for name in [n for n in tensors if n.startswith(old)]:
            proj, role = name[len(old) :].split(".", 1)
            new = f"{old}{renames[proj]}.{role}"
            tensors[new] = tensors.pop(name)
            index["weight_map"][new] = index["weight_map"].pop(name)
            description[new] = description.pop(name)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    (src / DESCRIPTION_FILE).write_text(json.dumps(description))
    code, stdout, _ = cli("inspect", src, "--json", "--target", "vllm-ascend-0.25")
    problems = json.loads(stdout)["problems"]
    assert code == 2
    assert "model.layers.1.mlp.experts: experts mix the namings gate_proj/up_proj/down_proj and w1/w2/w3" in problems
    code, _, stderr = cli("convert", "--in", src, "--out", tmp_path / "out", "--target", "vllm-ascend-0.25")
    assert code == 2 and "experts mix the namings" in stderr
