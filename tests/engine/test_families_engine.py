"""Families that name their experts w1/w2/w3, through the real vLLM 0.23.0 and vllm-ascend 0.23.0 code.

vllm-ascend's own ``AscendModelSlimConfig`` picks each layer's method with its own renaming for the model
type (``deepseek_v4``: ``QUANT_MODEL_*_MAPPINGS`` and the description adaptations; ``minimax_m2``: its
``get_quant_method`` prefix rewrite); the layer is fed as the model's ``load_weights`` feeds it (the
engine's renaming, then vLLM's own expert params mapping). Stock loads the unconverted checkpoint, the
plugin the converted one, at MoE tensor parallelism 1 to 16, expert parallelism and dynamic EPLB; every
tensor left for the kernels must be equal. DeepSeek-V4's MTP layer is served the same way.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from safetensors import safe_open
from vllm.model_executor.models.utils import WeightsMapper
from vllm_ascend.quantization.methods import registry, w4a8

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.experts import DEFAULT_NAMING, NAMINGS, ROLES
from w4a8conv.names import DESCRIPTION_FILE, PREPACKED_TYPE
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.serving import vllm_plugin
from w4a8conv.serving.vllm_plugin import canary_check as canary
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from . import harness
from .harness import Serving, bare_moe_layer, build, load_as_model

SIZES = (4, 128, 256)  # experts, hidden, moe_intermediate
# vllm-ascend's msModelSlim config: quantization/modelslim_config.py up to 0.27, quantization/configs/ from 0.30
try:
    from vllm_ascend.quantization.configs import modelslim_config
except ImportError:
    from vllm_ascend.quantization import modelslim_config


def _deepseek_v4_rename(name: str) -> str:
    """DeepSeek-V4's load_weights renaming, as vllm-ascend tabulates it for the quant description."""
    mapper = WeightsMapper(
        orig_to_new_prefix=modelslim_config.QUANT_MODEL_PREFIX_MAPPINGS["deepseek_v4"],
        orig_to_new_substr=modelslim_config.QUANT_MODEL_SUBSTR_MAPPINGS["deepseek_v4"],
    )
    return mapper._map_name(name)


# family: (hf model_type, the checkpoint's names the model's loader maps, [(vLLM layer prefix, checkpoint prefix)])
FAMILIES = {
    "deepseek-v4": (
        "deepseek_v4",
        _deepseek_v4_rename,
        ("gate_proj", "down_proj", "up_proj"),
        [("model.layers.0.mlp.experts", "layers.0.ffn.experts"), ("mtp.0.mlp.experts", "mtp.0.ffn.experts")],
    ),
    "minimax-m2": (
        "minimax_m2",
        lambda name: name,
        ("w1", "w2", "w3"),
        [("model.layers.0.mlp.experts", "model.layers.0.block_sparse_moe.experts")],
    ),
}
MODES = [("tp", 1), ("tp", 2), ("tp", 4), ("tp", 8), ("tp", 16), ("ep", 4), ("eplb", 4)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        spec = SyntheticSpec(
            family=family, hidden=SIZES[1], intermediate=SIZES[2], experts=SIZES[0], dense_layers=0, moe_layers=1
        )
        src = write_checkpoint(root / family, "v1.0.0-per-channel", spec)
        made[family] = (src, convert_checkpoint(src, root / f"{family}-out", target="vllm-ascend-0.23").out_dir)
    return made


@pytest.fixture(autouse=True)
def serving(monkeypatch):
    canary.forget()
    with harness.serving():
        yield monkeypatch
    canary.forget()
    Serving.expert_parallel = Serving.dynamic_eplb = Serving.mix_placement = False


def engine_method(monkeypatch, description: dict, model_type: str, vllm_prefix: str) -> type:
    """The W4A8 method class vllm-ascend's own config picks for a FusedMoE layer of this model type."""
    hf_config = SimpleNamespace(model_type=model_type)
    monkeypatch.setattr(
        modelslim_config,
        "get_current_vllm_config",
        lambda: SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, hf_text_config=hf_config)),
    )
    Serving.description = description
    layer = bare_moe_layer()
    layer.moe_config = SimpleNamespace()
    method = modelslim_config.AscendModelSlimConfig(json.loads(json.dumps(description))).get_quant_method(
        layer, vllm_prefix
    )
    return type(method.quant_method)


def serve(family: str, path, description: dict, method_class, prefix: str, experts, tp_size: int, rank: int):
    _, rename, names, _ = FAMILIES[family]
    layer = build(path, description, method_class, SIZES, experts, tp_size, rank)
    load_as_model(layer, path, prefix, rename, names)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("mode", "size"), MODES, ids=[f"{m}{n}" for m, n in MODES])
def test_the_plugin_serves_a_family_through_the_engine_s_renaming_as_stock_does(
    serving, checkpoints, family, mode, size
):
    src, out = checkpoints[family]
    model_type, _, _, layers = FAMILIES[family]
    vllm_plugin.register()
    source = json.loads((src / DESCRIPTION_FILE).read_text())
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    Serving.expert_parallel = mode in ("ep", "eplb")
    Serving.dynamic_eplb = mode == "eplb"
    ranks = [(r, list(range(SIZES[0]))) for r in sorted({0, size - 1})]
    if Serving.expert_parallel:
        ranks = [(r, list(range(r, SIZES[0], size))) for r in sorted({0, size - 1})]
    for vllm_prefix, prefix in layers:
        stock_class = engine_method(serving, source, model_type, vllm_prefix)
        plugin_class = engine_method(serving, processed, model_type, vllm_prefix)
        assert stock_class is w4a8.AscendW4A8DynamicFusedMoEMethod
        assert plugin_class is registry.get_scheme_class(PREPACKED_TYPE, "moe")
        for rank, experts in ranks:
            canary.forget()
            if harness.refused_at(1 if Serving.expert_parallel else size):
                # stock's own loader fails on msModelSlim's w2 scale_bias [H, 16]
                with pytest.raises(RuntimeError, match=r"must match the size|match the broadcast shape"):
                    serve(family, src, source, stock_class, prefix, experts, size, rank)
                with pytest.raises(ValueError, match=harness.STOCK_FAILS):
                    serve(family, out, processed, plugin_class, prefix, experts, size, rank)
                continue
            stock = serve(family, src, source, stock_class, prefix, experts, size, rank)
            ours = serve(family, out, processed, plugin_class, prefix, experts, size, rank)
            held_stock, held_ours = canary.held_tensors(stock), canary.held_tensors(ours)
            assert held_stock and set(held_stock) == set(held_ours)
            assert canary.first_difference(held_stock, held_ours, {}) is None, (vllm_prefix, rank)


def test_mix_placement_fails_on_stock_and_the_plugin_refuses_it(serving, checkpoints):
    """DeepSeek-V4's mix_placement loads the shared experts (W8A8_DYNAMIC) as experts after the routed ones:
    stock's W4A8 parameters cannot take their int8 [I, H] weights; the plugin says so before loading."""
    src, out = checkpoints["deepseek-v4"]
    vllm_plugin.register()
    source = json.loads((src / DESCRIPTION_FILE).read_text())
    Serving.mix_placement = True
    experts = SIZES[0] + 1  # the routed experts and one shared expert
    stock = w4a8.AscendW4A8DynamicFusedMoEMethod
    layer = build(src, source, stock, (experts, *SIZES[1:]), list(range(experts)), 1, 0)
    ckpt = open_checkpoint(src)
    name = "layers.0.ffn.shared_experts.w1.weight"
    with safe_open(str(ckpt.tensors[name].path), "pt") as f:
        weight = f.get_tensor(name)
    with pytest.raises(RuntimeError, match="must match the size"):
        layer.w13_weight.weight_loader(layer.w13_weight, weight, "w13_weight", shard_id="w1", expert_id=SIZES[0])
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    with pytest.raises(ValueError, match=r"^w4a8conv: mix_placement is on"):
        engine_method(serving, processed, "deepseek_v4", "model.layers.0.mlp.experts")


def test_w4a8conv_s_expert_table_agrees_with_the_engine_s_renaming():
    """Which of w1/w2/w3 is gate, up and down: w4a8conv.experts says as vllm-ascend's deepseek_v4 renaming and
    vLLM's MiniMax-M2 expert mapping do (a conversion itself treats gate and up alike, so only this shows)."""
    for naming in NAMINGS:
        for role in ROLES:
            renamed = _deepseek_v4_rename(f"layers.0.ffn.experts.0.{naming.name_of(role)}.weight")
            assert renamed == f"model.layers.0.mlp.experts.0.{DEFAULT_NAMING.name_of(role)}.weight"
    minimax = FAMILIES["minimax-m2"][2]  # vLLM's minimax_m2: ckpt gate, down, up projection names
    assert minimax == (NAMINGS[1].gate, NAMINGS[1].down, NAMINGS[1].up)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_engine_serves_every_family_at_every_default_layout(checkpoints, family):
    from w4a8conv.serving.vllm_plugin.check_engine import DEFAULT_LAYOUTS, check_engine

    _, verdicts = check_engine(checkpoints[family][1])
    assert len(verdicts) == 2 * len(DEFAULT_LAYOUTS) - 1
    layouts = [layout for layout in DEFAULT_LAYOUTS for _ in {0, layout.size - 1}]
    assert [v.serves for v in verdicts] == [not harness.refused_at(layout.moe_tp) for layout in layouts], [
        v.reason for v in verdicts if not v.serves
    ]
    assert verdicts[0].checked == [f"MoE expert {FAMILIES[family][3][0][1]}.0"]
