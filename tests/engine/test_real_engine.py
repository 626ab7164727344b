"""The plugin and its canary through the real vLLM 0.23.0 and vllm-ascend 0.23.0 code (``make test-engine``).

vLLM's own FusedMoE weight loader, vllm-ascend's own method adapter, scheme registry and W4A8_DYNAMIC
MoE method; only torch_npu is stood in (``stubs/torch_npu``: the two int4 packing operators and the NZ
cast, emulated on the CPU). For every source layout, at MoE tensor parallelism 1, 2, 4, 8 and 16, expert
parallelism and dynamic EPLB, stock vllm-ascend loads the unconverted checkpoint and the plugin the
converted one; every tensor left for the kernels must be equal (a mindie bias, which stock computes in
fp32 in the device's order, within the summation bound), or the plugin must refuse where stock cannot
serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_npu
from safetensors import safe_open
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm_ascend.quantization import method_adapters
from vllm_ascend.quantization.methods import registry, w4a8

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import DESCRIPTION_FILE, PREPACKED_TYPE
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.serving import vllm_plugin
from w4a8conv.serving.vllm_plugin import canary_check as canary
from w4a8conv.serving.vllm_plugin import sandbox
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from . import harness
from .harness import Serving, build, load

SPEC = SyntheticSpec(hidden=128, intermediate=256, experts=4, dense_layers=0, moe_layers=1, w4a8_linear=False)
LAYER = "model.layers.0.mlp.experts"
LAYOUTS = ("mindie", "v1.0.0-per-group", "v1.0.0-per-channel", "compressed-tensors")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return layout_checkpoints(tmp_path_factory)


def layout_checkpoints(tmp_path_factory) -> dict:
    """Every source layout at SPEC's shapes and its conversion for vllm-ascend-0.23: (source, output)."""
    root = tmp_path_factory.mktemp("engine")
    made = {}
    for layout in LAYOUTS:
        src = write_checkpoint(root / layout, layout, SPEC)
        made[layout] = (src, convert_checkpoint(src, root / f"{layout}-out", target="vllm-ascend-0.23").out_dir)
    return made


@pytest.fixture(autouse=True)
def serving():
    canary.forget()
    torch_npu.calls.clear()
    with harness.serving():
        yield
    canary.forget()
    Serving.expert_parallel = Serving.dynamic_eplb = False


def stock_description(src: Path) -> dict:
    return harness.stock_description(src, SPEC.group_size)


def serve(path: Path, description: dict, method_class, local_experts, tp_size, tp_rank) -> torch.nn.Module:
    sizes = (SPEC.experts, SPEC.hidden, SPEC.intermediate)
    layer = build(path, description, method_class, sizes, local_experts, tp_size, tp_rank)
    load(layer, path, LAYER)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


MODES = [("tp", 1), ("tp", 2), ("tp", 4), ("tp", 8), ("tp", 16), ("ep", 4), ("eplb", 4)]


def stock_cannot_serve(layout: str, mode: str, size: int) -> str | None:
    """Where stock vllm-ascend itself serves wrong numbers or fails, and so the plugin or its canary refuses."""
    if harness.PER_CHANNEL_ONLY and layout in ("mindie", "v1.0.0-per-group"):
        return harness.PER_GROUP_REFUSAL  # main's own method refuses them, and so the plugin's (its subclass)
    if harness.refused_at(1 if mode != "tp" else size, layout):
        return harness.STOCK_FAILS
    if layout in ("mindie", "v1.0.0-per-group") and mode == "tp" and size > 1:
        # vLLM's loader gives no rank any of w2_weight_scale [H, 1] (marked "group"); at tp 16 (I/tp < g)
        # process_scale fails first; the plugin's own check of whole groups refuses before either.
        return "w2_weight_scale .* unloaded|not a whole number of groups|cannot load or process the canary"
    if layout == "mindie" and mode == "eplb":
        # the per-expert lists hold the unpacked int8 weights, which apply views as int32 words
        return r"computes w13_weight_list\[0\] .* as int8 \[128, 512\], the checkpoint gives int8 \[128, 256\]"
    if layout == "compressed-tensors" and mode == "eplb" and not harness.PER_CHANNEL_ONLY:
        # the compressed-tensors processing builds no per-expert lists, which apply reads under dynamic EPLB
        return "computes w13_scale_bias of the canary .* the checkpoint gives nothing"
    return None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("mode", "size"), MODES, ids=[f"{m}{n}" for m, n in MODES])
def test_plugin_parameters_equal_stock_vllm_ascend(checkpoints, layout, mode, size):
    src, out = checkpoints[layout]
    vllm_plugin.register()
    stock_class = registry.get_scheme_class("W4A8_DYNAMIC", "moe")
    plugin_class = registry.get_scheme_class(PREPACKED_TYPE, "moe")
    assert stock_class is w4a8.AscendW4A8DynamicFusedMoEMethod and issubclass(plugin_class, stock_class)
    Serving.expert_parallel = mode in ("ep", "eplb")
    Serving.dynamic_eplb = mode == "eplb"
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    ranks = [(r, list(range(SPEC.experts))) for r in sorted({0, size - 1})]
    if Serving.expert_parallel:  # each rank holds its share of the experts, whole
        ranks = [(r, list(range(r, SPEC.experts, size))) for r in sorted({0, size - 1})]
    refusal = stock_cannot_serve(layout, mode, size)
    try:
        for rank, experts in ranks:
            canary.forget()
            if refusal is not None:
                with pytest.raises(ValueError, match=refusal):
                    serve(out, processed, plugin_class, experts, size, rank)
                continue
            stock = serve(src, stock_description(src), stock_class, experts, size, rank)
            assert not [n for n, p in stock.named_parameters() if p.is_floating_point() and bool(p.isnan().any())]
            ours = serve(out, processed, plugin_class, experts, size, rank)
            assert [c[0] for c in torch_npu.calls[-2:]] == ["npu_format_cast(29)"] * 2  # as stock, on int8
            tolerance = {}
            if layout == "mindie":  # stock sums fp32 products in its own order
                tolerance = {"w13_scale_bias": 1e-3, "w2_scale_bias": 1e-3}
            held_stock, held_ours = canary.held_tensors(stock), canary.held_tensors(ours)
            assert set(held_stock) == set(held_ours)
            assert canary.first_difference(held_stock, held_ours, tolerance) is None, (rank, layout)
    finally:
        Serving.expert_parallel = Serving.dynamic_eplb = False


@pytest.mark.skipif(harness.PER_CHANNEL_ONLY, reason="this vllm-ascend refuses per-group weights itself")
def test_stock_leaves_a_per_group_w2_scale_unloaded_at_moe_tensor_parallel_2(checkpoints):
    """What the canary refuses above: vLLM 0.23's loader slices a [H, 1] scale marked "group" by its own
    size // tp, which is 0 columns, so stock never writes w2_weight_scale (torch.empty is served)."""
    src, _ = checkpoints["v1.0.0-per-group"]
    sizes = (SPEC.experts, SPEC.hidden, SPEC.intermediate)
    stock = w4a8.AscendW4A8DynamicFusedMoEMethod
    layer = build(src, stock_description(src), stock, sizes, list(range(SPEC.experts)), 2, 0)
    layer.w2_weight_scale.data.fill_(float("nan"))
    load(layer, src, LAYER)
    assert bool(torch.isnan(layer.w2_weight_scale.data).all())


@pytest.mark.parametrize("layout", ["v1.0.0-per-channel", "compressed-tensors"])
def test_the_canary_refuses_an_engine_changed_in_one_line(checkpoints, monkeypatch, layout):
    """The real 0.23 method with one line of its processing changed (the scale_bias summation)."""
    out = checkpoints[layout][1]
    vllm_plugin.register()
    original = w4a8.AscendW4A8DynamicFusedMoEMethod.process_weights_after_loading

    def changed(self, layer):
        original(self, layer)
        layer.w2_scale_bias.data = layer.w2_scale_bias.data * (1 + 2**-20)

    monkeypatch.setattr(w4a8.AscendW4A8DynamicFusedMoEMethod, "process_weights_after_loading", changed)
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    plugin_class = registry.get_scheme_class(PREPACKED_TYPE, "moe")
    with pytest.raises(ValueError, match="computes w2_scale_bias of the canary MoE expert"):
        serve(out, processed, plugin_class, list(range(SPEC.experts)), 1, 0)


LINEAR_SPEC = SyntheticSpec(hidden=128, intermediate=128, experts=2, dense_layers=1, moe_layers=1, group_size=32)


@pytest.fixture(scope="module")
def linear_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-linear")
    made = {}
    for layout in ("mindie", "v1.0.0-per-group"):
        src = write_checkpoint(root / layout, layout, LINEAR_SPEC)
        made[layout] = (src, convert_checkpoint(src, root / f"{layout}-out", target="vllm-ascend-0.23").out_dir)
    return made


def loader_only(cls, method, in_features: int, out_sizes: list[int], tp_size: int, tp_rank: int):
    """vLLM's Row/Column/MergedColumnParallelLinear with its own weight_loader, without the model around it."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.tp_size, layer.tp_rank, layer.prefix = tp_size, tp_rank, "canary-test"
    layer.output_sizes = out_sizes
    row = issubclass(cls, RowParallelLinear)
    if row:
        layer.input_is_parallel = True
    adapter = method_adapters.AscendLinearMethod.__new__(method_adapters.AscendLinearMethod)
    adapter.quant_method = method
    layer.quant_method = adapter
    in_part = in_features // tp_size if row else in_features
    out_parts = out_sizes if row else [n // tp_size for n in out_sizes]
    adapter.create_weights(
        layer, in_part, out_parts, in_features, sum(out_sizes), torch.bfloat16, weight_loader=layer.weight_loader
    )
    return layer


def linear_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    out = {}
    for name in (n for n in ckpt.tensors if n.startswith(prefix + ".")):
        with safe_open(str(ckpt.tensors[name].path), "pt") as f:
            out[name[len(prefix) + 1 :]] = f.get_tensor(name)
    return out


@pytest.mark.skipif(harness.ENGINE.linear_method is None, reason="this vllm-ascend has no W4A8_DYNAMIC Linear")
@pytest.mark.parametrize("layout", ["mindie", "v1.0.0-per-group"])
@pytest.mark.parametrize("kind", ["row", "column", "merged"])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_plugin_linear_parameters_equal_stock_vllm_ascend(linear_checkpoints, layout, kind, tp_size):
    """o_proj through RowParallelLinear, q_b_proj through ColumnParallelLinear, and q_b_proj twice as the
    two shards of a MergedColumnParallelLinear (a dense gate_up_proj's loader), every rank's parameters."""
    src, out = linear_checkpoints[layout]
    vllm_plugin.register()
    stock_class = registry.get_scheme_class("W4A8_DYNAMIC", "linear")
    plugin_class = registry.get_scheme_class(PREPACKED_TYPE, "linear")
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    cls = {"row": RowParallelLinear, "column": ColumnParallelLinear, "merged": MergedColumnParallelLinear}[kind]
    prefix = f"model.layers.0.self_attn.{'o_proj' if kind == 'row' else 'q_b_proj'}"
    shards = [None] if kind != "merged" else [0, 1]
    n = LINEAR_SPEC.hidden
    for rank in sorted({0, tp_size - 1}):
        layers = []
        for path, description, method_class in (
            (src, stock_description(src), stock_class),
            (out, processed, plugin_class),
        ):
            canary.forget()
            Serving.description, Serving.model, Serving.tp_size = description, str(path), tp_size
            layer = loader_only(cls, method_class(), n, [n] * len(shards), tp_size, rank)
            for name, tensor in linear_tensors(path, prefix).items():
                param = getattr(layer, name, None)
                if param is None:
                    continue
                for shard in shards:
                    args = () if shard is None else (shard,)
                    param.weight_loader(param, tensor, *args)
            layer.quant_method.process_weights_after_loading(layer)
            layers.append(layer)
        stock, ours = (canary.held_tensors(layer, ("weight_scale",)) for layer in layers)
        tolerance = {"weight_scale_bias": 1e-3} if layout == "mindie" else {}
        assert set(stock) == set(ours)
        assert canary.first_difference(stock, ours, tolerance) is None, (kind, rank)


def test_the_layers_are_vllm_s_own_moe_layers(checkpoints):
    """The tests load through the layer vLLM keeps MoE weights on, and its own weight_loader: RoutedExperts (in
    vLLM 0.23 the name of FusedMoE, a class of its own from 0.24 on), as a server builds it."""
    from vllm.model_executor.layers import fused_moe

    src, _ = checkpoints["v1.0.0-per-channel"]
    sizes = (SPEC.experts, SPEC.hidden, SPEC.intermediate)
    layer = build(src, stock_description(src), w4a8.AscendW4A8DynamicFusedMoEMethod, sizes, [0, 1], 2, 1)
    assert isinstance(layer, fused_moe.RoutedExperts)
    assert layer.weight_loader.__func__ is fused_moe.RoutedExperts.weight_loader
    assert isinstance(layer.quant_method, method_adapters.AscendFusedMoEMethod)


def test_a_loader_that_copies_w2_scale_bias_whole_is_handed_each_rank_s_chunks(checkpoints, monkeypatch):
    """vLLM 0.27's RoutedExperts loader takes every tensor named *bias for an expert bias and copies a w2 one
    whole (here the engine's own loader, changed that way). The plugin finds that by loading a marked tensor as
    the layer is made and hands the loader each rank's chunks: a compressed-tensors output (whose source has no
    scale_bias) serves at MoE tp 2 equal to stock; a per-channel one is refused, as stock cannot load its source
    there. A loader that gives the rank none of them is refused before any weight loads."""
    vllm_plugin.register()
    cls = sandbox.moe_layer_class()
    original = cls.weight_loader

    def bias_copied_whole(self, param, loaded_weight, weight_name, shard_id, expert_id, **kwargs):
        if "bias" in weight_name and shard_id == "w2":
            local = self._map_global_expert_id_to_local_expert_id(expert_id)
            return param.data[local].copy_(loaded_weight) if local >= 0 else None
        return original(self, param, loaded_weight, weight_name, shard_id, expert_id, **kwargs)

    monkeypatch.setattr(cls, "weight_loader", bias_copied_whole)
    stock_class = registry.get_scheme_class("W4A8_DYNAMIC", "moe")
    plugin_class = registry.get_scheme_class(PREPACKED_TYPE, "moe")
    experts = list(range(SPEC.experts))
    src, out = checkpoints["compressed-tensors"]
    processed = json.loads((out / DESCRIPTION_FILE).read_text())
    for rank in (0, 1):
        canary.forget()
        stock = serve(src, stock_description(src), stock_class, experts, 2, rank)
        ours = serve(out, processed, plugin_class, experts, 2, rank)
        held_stock, held_ours = canary.held_tensors(stock), canary.held_tensors(ours)
        assert set(held_stock) == set(held_ours)
        assert canary.first_difference(held_stock, held_ours, {}) is None, rank
    canary.forget()
    per_channel = checkpoints["v1.0.0-per-channel"][1]
    with pytest.raises(ValueError, match=harness.STOCK_FAILS + "The size of tensor a"):
        serve(per_channel, json.loads((per_channel / DESCRIPTION_FILE).read_text()), plugin_class, experts, 2, 1)

    def bias_dropped(self, param, loaded_weight, weight_name, shard_id, expert_id, **kwargs):
        if "bias" in weight_name and shard_id == "w2":
            return None
        return original(self, param, loaded_weight, weight_name, shard_id, expert_id, **kwargs)

    monkeypatch.setattr(cls, "weight_loader", bias_dropped)
    canary.forget()
    with pytest.raises(
        ValueError,
        match=r"^w4a8conv: this vLLM's MoE weight loader does not give MoE tensor-parallel rank 1 of 2 its 8 of the 16 "
        r"w2_scale_bias chunks \(rank 1 gets \[128, 8\] other values\); serve with --enable-expert-parallel",
    ):
        build(out, processed, plugin_class, (SPEC.experts, SPEC.hidden, SPEC.intermediate), experts, 2, 1)
