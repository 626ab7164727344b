"""The vLLM plugin loads a converted checkpoint into layers whose parameters equal what stock
vllm-ascend's processing gives for the unconverted one: both release generations, expert parallel and
MoE tensor parallel, Linear layers, with stand-ins for vLLM, vllm-ascend and torch_npu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import CANARY_FILE, CANARY_SKIP_ENV, PREPACKED_TYPE
from w4a8conv.serving import vllm_plugin
from w4a8conv.serving.runtime import ProcessedCheckpoint
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from . import stand_ins
from .conftest import LEGACY_TARGET, SPEC
from .upstream_reference import UpstreamReference

MOE_LAYER = f"model.layers.{SPEC.dense_layers}.mlp.experts"


@pytest.fixture(params=["registry", "quantizer"])
def release(request, monkeypatch):
    if request.param == "quantizer":  # its stand-in emulates no processing: nothing to check a canary with
        monkeypatch.setenv(CANARY_SKIP_ENV, "1")
    stand_ins.install(request.param)
    yield request.param
    stand_ins.uninstall()


def registered(release: str) -> tuple[type, type]:
    vllm_plugin.register()
    if release in ("registry", "main"):
        from vllm_ascend.quantization.methods.registry import get_scheme_class

        return get_scheme_class(PREPACKED_TYPE, "linear"), get_scheme_class(PREPACKED_TYPE, "moe")
    from vllm_ascend.quantization.quantizer import SUPPORT_ASCEND_QUANTIZER_TYPE

    quantizer = SUPPORT_ASCEND_QUANTIZER_TYPE[PREPACKED_TYPE]
    return quantizer.build_linear_method, quantizer.build_moe_method


def configure(path, tp_size: int = 1) -> ProcessedCheckpoint:
    ckpt = ProcessedCheckpoint(path)
    stand_ins.Config.description = json.loads((path / "quant_model_description.json").read_text())
    stand_ins.Config.tp_size = tp_size
    stand_ins.Config.model_path = path
    return ckpt


def all_tensors(ckpt: ProcessedCheckpoint, prefix: str) -> dict[str, torch.Tensor]:
    return ckpt.tensors([n for n in ckpt.weight_map if n.startswith(prefix + ".")])


@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 0), (2, 1)])
def test_moe_parameters_equal_stock_processing(
    release, layout, converted_checkpoints, source_checkpoints, tp_size, tp_rank
):
    if release == "quantizer" and layout.endswith("per-channel"):
        pytest.skip("the mid-2025 vllm-ascend had no per-channel W4A8 MoE")
    _, moe_method = registered(release)
    ckpt = configure(converted_checkpoints[layout], tp_size)
    layer = stand_ins.FusedMoELayer(
        moe_method(), list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, tp_size, tp_rank
    )
    layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
    if release == "registry" and tp_size > 1 and layout in ("mindie", "v1.0.0-per-group"):
        # vLLM 0.23's loader gives no rank any of a per-group w2_weight_scale [H, 1] (marked "group" by
        # vllm-ascend 0.23): stock serves uninitialised scales there; the canary says so.
        with pytest.raises(ValueError, match=r"leaves w2_weight_scale of the canary MoE expert .* unloaded"):
            layer.quant_method.process_weights_after_loading(layer)
        return
    layer.quant_method.process_weights_after_loading(layer)
    expected = UpstreamReference(source_checkpoints[layout]).moe(MOE_LAYER, SPEC.experts, tp_size, tp_rank)
    scale_names = dict(
        zip(("w13_weight_scale", "w2_weight_scale"), vllm_plugin.detect_api().moe_scale_names, strict=True)
    )
    for name, value in expected.items():
        got = getattr(layer, scale_names.get(name, name))
        assert got.dtype == value.dtype and got.shape == value.shape, name
        if name.endswith("scale_bias") and layout == "mindie":  # upstream recomputes it in fp32
            torch.testing.assert_close(got.data, value, rtol=1e-5, atol=1e-5)
        else:  # stored chunks summed with upstream's expression: bit for bit
            assert torch.equal(got.data, value), name
    if release == "registry":  # 0.23 casts the int8 view of both weights to NZ
        assert [c[0] for c in stand_ins.nz_casts[-2:]] == ["torch.int8", "torch.int8"]  # after the canary's


def test_expert_parallel_rank_loads_only_its_experts(release, converted_checkpoints, source_checkpoints):
    _, moe_method = registered(release)
    ckpt = configure(converted_checkpoints["mindie"])
    mine = [1, 3]
    layer = stand_ins.FusedMoELayer(moe_method(), mine, SPEC.hidden, SPEC.intermediate, 1, 0)
    layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
    layer.quant_method.process_weights_after_loading(layer)
    everything = UpstreamReference(source_checkpoints["mindie"]).moe(MOE_LAYER, SPEC.experts)
    assert torch.equal(layer.w13_weight.data, everything["w13_weight"][mine])
    torch.testing.assert_close(layer.w2_scale_bias.data, everything["w2_scale_bias"][mine], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout_name", ["mindie", "v1.0.0-per-group"])
@pytest.mark.parametrize("proj,row_parallel", [("q_b_proj", False), ("o_proj", True)])
def test_linear_parameters_equal_stock_processing(
    release, converted_checkpoints, source_checkpoints, layout_name, proj, row_parallel
):
    linear_method, _ = registered(release)
    ckpt = configure(converted_checkpoints[layout_name])
    prefix = f"model.layers.0.self_attn.{proj}"
    layer = stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, row_parallel, 1, 0)
    layer.load(prefix, all_tensors(ckpt, prefix))
    layer.quant_method.process_weights_after_loading(layer)
    expected = UpstreamReference(source_checkpoints[layout_name]).linear(prefix)
    if release == "quantizer":  # that release's Linear knew only the mindie bias
        expected.pop("scale_bias", None)
    for name, value in expected.items():
        got = getattr(layer, name).data
        assert got.dtype == value.dtype and got.shape == value.shape, name
        if "bias" in name:
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, value), name


@pytest.mark.parametrize("row_parallel", [False, True])
def test_linear_tensor_parallel_shares_reassemble(release, converted_checkpoints, row_parallel):
    linear_method, _ = registered(release)
    ckpt = configure(converted_checkpoints["v1.0.0-per-group"])
    prefix = "model.layers.0.self_attn.o_proj" if row_parallel else "model.layers.0.self_attn.q_b_proj"
    tensors = all_tensors(ckpt, prefix)
    ranks = []
    for rank in (0, 1):
        layer = stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, row_parallel, 2, rank)
        layer.load(prefix, tensors)
        ranks.append(layer)
    dim = 0 if row_parallel else 1
    whole = torch.cat([r.weight.data for r in ranks], dim)
    assert torch.equal(whole, tensors[f"{prefix}.weight"])
    scales = torch.cat([r.weight_scale_second.data for r in ranks], dim)
    assert torch.equal(scales, tensors[f"{prefix}.weight_scale_second"])


def test_register_without_vllm_ascend_is_a_no_op():
    stand_ins.uninstall()
    vllm_plugin.register()  # must not raise where vllm-ascend is absent (e.g. a CUDA vLLM)


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"]["w4a8conv"] == "w4a8conv.serving.vllm_plugin:register"
    assert "vllm-ascend" in project["optional-dependencies"]


@pytest.mark.parametrize("layout_name", ["v1.0.0-per-channel", "compressed-tensors"])
@pytest.mark.parametrize("tp_size", [4, 8, 16])
def test_moe_tensor_parallel_up_to_16(release, tmp_path, tp_size, layout_name):
    """Up to the largest MoE tensor parallelism upstream allows: each rank sums its share of the 16 chunks.
    For compressed-tensors, main computes each rank's bias from the rank's input slice; the same bits."""
    if release == "quantizer":
        pytest.skip("per-channel W4A8 MoE appeared after the mid-2025 release")
    spec = SyntheticSpec(intermediate=128, experts=2, moe_layers=1, w4a8_linear=False)
    src = write_checkpoint(tmp_path / "src", layout_name, spec)
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir  # served by 0.23
    _, moe_method = registered(release)
    ckpt = configure(out, tp_size=tp_size)
    layer_prefix = f"model.layers.{spec.dense_layers}.mlp.experts"
    for rank in sorted({0, tp_size // 2 - 1, tp_size - 1}):
        layer = stand_ins.FusedMoELayer(moe_method(), [0, 1], spec.hidden, spec.intermediate, tp_size, rank)
        layer.load(layer_prefix, all_tensors(ckpt, layer_prefix))
        layer.quant_method.process_weights_after_loading(layer)
        expected = UpstreamReference(src).moe(layer_prefix, 2, tp_size=tp_size, tp_rank=rank)
        for name, value in expected.items():
            assert torch.equal(getattr(layer, name).data, value), (rank, name)


def test_dynamic_eplb_gets_per_expert_lists(converted_checkpoints, source_checkpoints):
    stand_ins.install("registry")
    try:
        _, moe_method = registered("registry")
        ckpt = configure(converted_checkpoints["v1.0.0-per-group"])
        stand_ins.Config.dynamic_eplb = True
        method = moe_method()
        layer = stand_ins.FusedMoELayer(method, list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, 1, 0)
        layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
        layer.quant_method.process_weights_after_loading(layer)
        expected = UpstreamReference(source_checkpoints["v1.0.0-per-group"]).moe(MOE_LAYER, SPEC.experts)
        assert not hasattr(layer, "w13_weight")
        assert len(layer.w13_weight_list) == SPEC.experts
        for e in range(SPEC.experts):
            assert torch.equal(layer.w13_weight_list[e].view(torch.int32), expected["w13_weight"][e])
            assert torch.equal(layer.w2_weight_scale_list[e], expected["w2_weight_scale"][e])
    finally:
        stand_ins.Config.dynamic_eplb = False
        stand_ins.uninstall()


def test_register_is_idempotent(release):
    """vllm-ascend 0.23's scheme registry refuses a second registration; the plugin registers once."""
    first = registered(release)
    vllm_plugin.register()
    assert registered(release) == first


@pytest.mark.parametrize("tp_size", [3, 6, 32])
def test_a_moe_tensor_parallel_size_that_does_not_divide_16_is_refused(release, converted_checkpoints, tp_size):
    """Each rank sums its share of the 16 stored scale_bias chunks: 16 // 3 chunks would load wrong biases."""
    _, moe_method = registered(release)
    configure(converted_checkpoints["mindie"], tp_size)
    with pytest.raises(ValueError, match=rf"must divide the checkpoint's 16 scale_bias chunks .*found {tp_size};"):
        moe_method()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_serving_in_another_dtype_than_the_checkpoint_was_made_for_is_refused(release, converted_checkpoints, dtype):
    """A W4A8 Linear's scales were rounded to the model dtype at conversion: another dtype serves other numbers."""
    linear_method, moe_method = registered(release)
    configure(converted_checkpoints["mindie"])
    found = str(dtype).removeprefix("torch.")
    message = rf"converted for dtype bfloat16 .* the server runs {found}; serve it with --dtype bfloat16"
    with pytest.raises(ValueError, match=message):
        stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, False, 1, 0, params_dtype=dtype)
    with pytest.raises(ValueError, match=message):
        stand_ins.FusedMoELayer(moe_method(), [0], SPEC.hidden, SPEC.intermediate, 1, 0, params_dtype=dtype)


def test_a_description_without_the_w4a8conv_section_is_refused(release, converted_checkpoints):
    linear_method, _ = registered(release)
    configure(converted_checkpoints["mindie"])
    del stand_ins.Config.description["w4a8conv"]
    with pytest.raises(ValueError, match="has no 'w4a8conv' section; convert the checkpoint again"):
        stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, False, 1, 0)


@pytest.mark.parametrize("where", [None, "vllm_ascend.ascend_forward_context", "vllm_ascend.ascend_config"])
def test_mega_moe_gets_the_lists_upstream_builds(converted_checkpoints, source_checkpoints, monkeypatch, where):
    """0.25.1rc1 and later build cann_mega_moe_* lists when enable_fused_mc2 == 1 and cann_ops_transformer is
    installed (the flag lives in ascend_forward_context, on main in ascend_config); 0.23 has no MegaMoE."""
    monkeypatch.setattr(stand_ins.Config, "mega_moe_supported", where)
    monkeypatch.setattr(stand_ins.Config, "enable_fused_mc2", 1)
    stand_ins.install("registry")
    try:
        _, moe_method = registered("registry")
        ckpt = configure(converted_checkpoints["v1.0.0-per-channel"])
        layer = stand_ins.FusedMoELayer(moe_method(), list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, 1, 0)
        layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
        layer.quant_method.process_weights_after_loading(layer)
        expected = UpstreamReference(source_checkpoints["v1.0.0-per-channel"]).moe(MOE_LAYER, SPEC.experts)
        if where is None:
            assert torch.equal(layer.w13_weight.data, expected["w13_weight"])
            return
        assert not any(hasattr(layer, name) for name in expected)
        for e in range(SPEC.experts):
            for name in ("w13", "w2"):
                weight = getattr(layer, f"cann_mega_moe_{name}_weight_list")[e]
                assert weight.dtype == torch.int8 and torch.equal(
                    weight, expected[f"{name}_weight"][e].view(torch.int8)
                )
                scale = getattr(layer, f"cann_mega_moe_{name}_weight_scale_list")[e]
                assert torch.equal(scale, expected[f"{name}_weight_scale"][e].reshape(-1))
                bias = getattr(layer, f"cann_mega_moe_{name}_scale_bias_list")[e]
                assert bias.dtype == torch.float32 and torch.equal(bias, expected[f"{name}_scale_bias"][e].reshape(-1))
        assert [dtype for dtype, _ in stand_ins.nz_casts[-2:]] == ["torch.int8", "torch.int8"]
    finally:
        stand_ins.uninstall()


@pytest.fixture
def main_release():
    stand_ins.install("main")
    yield
    stand_ins.uninstall()


def test_on_main_only_the_moe_scheme_is_registered(main_release):
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent there too
    from vllm_ascend.quantization.methods.registry import get_scheme_class

    assert vllm_plugin.detect_api().release == "registry-moe-only"
    assert get_scheme_class(PREPACKED_TYPE, "linear") is None and get_scheme_class(PREPACKED_TYPE, "moe") is not None


@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 1)])
def test_on_main_per_channel_moe_parameters_equal_stock_processing(
    main_release, converted_checkpoints, source_checkpoints, tp_size, tp_rank
):
    vllm_plugin.register()
    from vllm_ascend.quantization.methods.registry import get_scheme_class

    ckpt = configure(converted_checkpoints["v1.0.0-per-channel"], tp_size)
    method = get_scheme_class(PREPACKED_TYPE, "moe")()
    layer = stand_ins.FusedMoELayer(method, list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, tp_size, tp_rank)
    layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
    layer.quant_method.process_weights_after_loading(layer)
    expected = UpstreamReference(source_checkpoints["v1.0.0-per-channel"]).moe(
        MOE_LAYER, SPEC.experts, tp_size, tp_rank
    )
    for name, value in expected.items():
        got = getattr(layer, name).data
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert torch.equal(got, value), name


def test_on_main_expert_weight_lists_are_built(main_release, converted_checkpoints, source_checkpoints, monkeypatch):
    """main keeps per-expert lists (int8 weights) for dynamic EPLB and for the v2 model runner with EPLB."""
    monkeypatch.setattr(stand_ins.Config, "use_expert_weight_list", True)
    vllm_plugin.register()
    from vllm_ascend.quantization.methods.registry import get_scheme_class

    ckpt = configure(converted_checkpoints["v1.0.0-per-channel"])
    layer = stand_ins.FusedMoELayer(
        get_scheme_class(PREPACKED_TYPE, "moe")(), list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, 1, 0
    )
    layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
    layer.quant_method.process_weights_after_loading(layer)
    expected = UpstreamReference(source_checkpoints["v1.0.0-per-channel"]).moe(MOE_LAYER, SPEC.experts)
    assert not hasattr(layer, "w13_weight") and len(layer.w2_weight_list) == SPEC.experts
    for e in range(SPEC.experts):
        assert layer.w13_weight_list[e].dtype == torch.int8
        assert torch.equal(layer.w13_weight_list[e].view(torch.int32), expected["w13_weight"][e])
        assert torch.equal(layer.w13_weight_scale_list[e], expected["w13_weight_scale"][e])


def test_on_main_a_per_group_output_is_refused_by_upstream(main_release, converted_checkpoints):
    vllm_plugin.register()
    from vllm_ascend.quantization.methods.registry import get_scheme_class

    configure(converted_checkpoints["v1.0.0-per-group"])
    with pytest.raises(ValueError, match="Per-Group quantization, which is no longer supported"):
        get_scheme_class(PREPACKED_TYPE, "moe")()


def test_moe_scale_bias_is_upstreams_to_the_bit_where_chunk_magnitudes_differ(tmp_path):
    """Stored chunks of very different sizes (most real down_proj biases): the sum order decides the last bit."""
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-channel", SyntheticSpec(w4a8_linear=False, moe_layers=1))
    index = json.loads(next(src.glob("*.index.json")).read_text())["weight_map"]
    for name, shard in index.items():
        if name.endswith("down_proj.scale_bias"):
            tensors = load_file(src / shard)
            tensors[name] = tensors[name] * torch.logspace(0, -7, 16)
            save_file(tensors, src / shard, metadata={"format": "pt"})
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir
    stand_ins.install("registry")
    try:
        _, moe_method = registered("registry")
        ckpt = configure(out)
        layer = stand_ins.FusedMoELayer(moe_method(), list(range(SPEC.experts)), SPEC.hidden, SPEC.intermediate, 1, 0)
        layer.load(MOE_LAYER, all_tensors(ckpt, MOE_LAYER))
        layer.quant_method.process_weights_after_loading(layer)
        expected = UpstreamReference(src).moe(MOE_LAYER, SPEC.experts)
        assert torch.equal(layer.w2_scale_bias.data, expected["w2_scale_bias"])
        assert torch.equal(ProcessedCheckpoint(out).load_moe(MOE_LAYER)["w2_scale_bias"], expected["w2_scale_bias"])
    finally:
        stand_ins.uninstall()


def test_a_format_the_plugin_does_not_know_is_refused(release, converted_checkpoints):
    linear_method, _ = registered(release)
    configure(converted_checkpoints["mindie"])
    stand_ins.Config.description["w4a8conv"]["format_version"] = 3
    with pytest.raises(ValueError, match="format_version 3, this w4a8conv reads 1, 2"):
        stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, False, 1, 0)


@pytest.mark.parametrize("layout_name", ["v1.0.0-per-channel", "compressed-tensors"])
@pytest.mark.parametrize("tp_size", [4, 8, 16])
def test_on_main_moe_tensor_parallel_up_to_16(main_release, tmp_path, tp_size, layout_name):
    spec = SyntheticSpec(intermediate=128, experts=2, moe_layers=1, w4a8_linear=False)
    src = write_checkpoint(tmp_path / "src", layout_name, spec)
    out = convert_checkpoint(src, tmp_path / "out").out_dir  # the default target: main's
    vllm_plugin.register()
    from vllm_ascend.quantization.methods.registry import get_scheme_class

    ckpt = configure(out, tp_size=tp_size)
    layer_prefix = f"model.layers.{spec.dense_layers}.mlp.experts"
    for rank in (0, tp_size - 1):
        method = get_scheme_class(PREPACKED_TYPE, "moe")()
        layer = stand_ins.FusedMoELayer(method, [0, 1], spec.hidden, spec.intermediate, tp_size, rank)
        layer.load(layer_prefix, all_tensors(ckpt, layer_prefix))
        layer.quant_method.process_weights_after_loading(layer)
        expected = UpstreamReference(src).moe(layer_prefix, 2, tp_size=tp_size, tp_rank=rank)
        for name, value in expected.items():
            assert torch.equal(getattr(layer, name).data, value), (rank, name)


def serve_moe(path: Path, tp_size: int = 1, tp_rank: int = 0, experts=None) -> stand_ins.FusedMoELayer:
    """Load and process the MoE layer of a converted checkpoint on the installed stand-in, as a server does."""
    _, moe_method = registered(stand_ins.Config.release)
    ckpt = configure(path, tp_size)
    spec_experts = experts or list(range(len(ckpt.experts(MOE_LAYER_OF[path]))))
    layer = stand_ins.FusedMoELayer(moe_method(), spec_experts, *moe_sizes(ckpt, MOE_LAYER_OF[path]), tp_size, tp_rank)
    layer.load(MOE_LAYER_OF[path], all_tensors(ckpt, MOE_LAYER_OF[path]))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


MOE_LAYER_OF: dict = {}


def moe_sizes(ckpt: ProcessedCheckpoint, prefix: str) -> tuple[int, int]:
    down = ckpt.tensors([f"{prefix}.0.down_proj.weight"])[f"{prefix}.0.down_proj.weight"]  # int32 [I, H/8]
    return down.shape[1] * 8, down.shape[0]


@pytest.fixture
def small_output(tmp_path):
    """A per-channel checkpoint converted for 0.23, with random scale_bias chunks (so any other summation
    order rounds differently)."""

    def make(layout: str = "v1.0.0-per-channel", target: str = LEGACY_TARGET) -> Path:
        spec = SyntheticSpec(intermediate=128, experts=2, moe_layers=1, w4a8_linear=False)
        src = write_checkpoint(tmp_path / f"src-{layout}-{target}", layout, spec)
        for shard in src.glob("*.safetensors"):
            tensors = load_file(shard)
            gen = torch.Generator().manual_seed(1)
            for name in [n for n in tensors if n.endswith("down_proj.scale_bias")]:
                tensors[name] = torch.randn(tensors[name].shape, generator=gen) * 1e-2
            save_file(tensors, shard, metadata={"format": "pt"})
        out = convert_checkpoint(src, tmp_path / f"out-{layout}-{target}", target=target).out_dir
        MOE_LAYER_OF[out] = f"model.layers.{spec.dense_layers}.mlp.experts"
        return out

    return make


@pytest.mark.parametrize(
    ("target", "version", "warned"),
    [
        (LEGACY_TARGET, "0.23.0", False),
        (LEGACY_TARGET, "0.26.0rc1", False),
        (LEGACY_TARGET, "0.27.0", True),
        ("vllm-ascend-0.25", "0.23.0", True),
        ("vllm-ascend-0.25", "0.25.1rc1", False),
        ("vllm-ascend-0.25", "0.19.1rc2.dev1637+g182b75ea8", True),  # a source build of main
    ],
)
def test_behaviour_decides_not_the_version_string(small_output, monkeypatch, caplog, target, version, warned):
    """A release outside the contract, or a development build, is served when its own processing of the
    canary matches the checkpoint, with a warning that names what was checked."""
    out = small_output(target=target)
    monkeypatch.setattr(stand_ins.Config, "version", version)
    stand_ins.install("registry")
    try:
        with caplog.at_level("INFO"):
            serve_moe(out)
        lines = [r.getMessage() for r in caplog.records if "canary" in r.getMessage()]
        assert lines and all("bit for bit" in line for line in lines)
        assert any(r.levelname == "WARNING" for r in caplog.records if "canary" in r.getMessage()) == warned
    finally:
        stand_ins.uninstall()


@pytest.mark.parametrize("release", ["registry", "main"])
@pytest.mark.parametrize("mutation", ["scale_bias summation order", "transpose", "scale dtype", "list", "no NZ"])
def test_an_engine_that_processes_one_step_otherwise_is_refused(small_output, monkeypatch, release, mutation):
    """One changed line in the engine's W4A8 processing, whatever its version string, and the plugin
    refuses to serve, naming the tensor."""
    out = small_output()
    monkeypatch.setattr(stand_ins.Config, "mutation", mutation)
    monkeypatch.setattr(stand_ins.Config, "version", "0.23.0")
    if mutation == "list":
        monkeypatch.setattr(stand_ins.Config, "dynamic_eplb", True)
        monkeypatch.setattr(stand_ins.Config, "use_expert_weight_list", True)
    stand_ins.install(release)
    try:
        refusal = r"vllm-ascend 0\.23\.0 (computes|refuses|casts) .*canary MoE expert.*--target"
        with pytest.raises(ValueError, match=refusal):
            serve_moe(out)
    finally:
        stand_ins.uninstall()


@pytest.mark.parametrize("release", ["registry", "main"])
def test_an_unchanged_engine_of_any_version_serves(small_output, monkeypatch, release):
    out = small_output()
    monkeypatch.setattr(stand_ins.Config, "version", "9.9.9")
    stand_ins.install(release)
    try:
        serve_moe(out, tp_size=4, tp_rank=3)
    finally:
        stand_ins.uninstall()


def test_an_edited_canary_is_refused(small_output):
    out = small_output()
    canary_file = out / CANARY_FILE
    data = bytearray(canary_file.read_bytes())
    data[-1] ^= 1
    canary_file.chmod(0o644)
    canary_file.write_bytes(bytes(data))
    stand_ins.install("registry")
    try:
        with pytest.raises(ValueError, match="the canary was changed; restore it from the conversion or convert again"):
            serve_moe(out)
    finally:
        stand_ins.uninstall()


def test_skipping_the_canary_warns_and_falls_back_to_the_version(small_output, monkeypatch, caplog):
    out = small_output()
    monkeypatch.setenv(CANARY_SKIP_ENV, "1")
    monkeypatch.setattr(stand_ins.Config, "mutation", "transpose")  # not caught: the user insisted
    stand_ins.install("registry")
    try:
        with caplog.at_level("WARNING"):
            serve_moe(out)
        assert any(CANARY_SKIP_ENV in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(stand_ins.Config, "version", "0.27.0")
        stand_ins.install("registry")
        with pytest.raises(ValueError, match=r"found vllm-ascend 0\.27\.0; convert it again"):
            serve_moe(out)
    finally:
        stand_ins.uninstall()


def test_a_tensor_parallel_size_that_splits_int32_words_is_refused(tmp_path):
    """The tiny demo shapes (moe_intermediate 64) at MoE tp 16: 4 outputs a rank, half a converted word."""
    spec = SyntheticSpec(experts=2, moe_layers=1, w4a8_linear=False)
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-channel", spec)
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir
    MOE_LAYER_OF[out] = f"model.layers.{spec.dense_layers}.mlp.experts"
    stand_ins.install("registry")
    try:
        message = (
            r"^w4a8conv: MoE tensor-parallel size 16 gives each rank 4 of moe_intermediate 64, not a whole number "
            r"of the converted int32 words \(8 int4 each\); use MoE tensor-parallel size 1, 2, 4, 8 or "
        )
        with pytest.raises(ValueError, match=message):
            serve_moe(out, tp_size=16)
    finally:
        stand_ins.uninstall()


@pytest.mark.parametrize("tp_size", [2, 4])
def test_per_group_at_a_tensor_parallel_size_without_whole_groups_is_refused(tmp_path, tp_size):
    """A rank's slice of down_proj's input must be whole groups: I=64, g=32 at tp 4 (as DeepSeek-R1, I=2048,
    g=256, at tp 16) fails in stock vllm-ascend with a reshape error; the plugin names the sizes that work."""
    spec = SyntheticSpec(intermediate=64 * tp_size // 2, experts=2, moe_layers=1, w4a8_linear=False, group_size=32)
    src = write_checkpoint(tmp_path / "src", "v1.0.0-per-group", spec)
    out = convert_checkpoint(src, tmp_path / "out", target=LEGACY_TARGET).out_dir
    MOE_LAYER_OF[out] = f"model.layers.{spec.dense_layers}.mlp.experts"
    stand_ins.install("registry")
    try:
        with pytest.raises(ValueError, match=rf"group_size 32 at MoE tensor-parallel size {tp_size * 4} .*"):
            serve_moe(out, tp_size=tp_size * 4)
    finally:
        stand_ins.uninstall()


@pytest.mark.parametrize("tp_size", [2, 4])
def test_a_row_parallel_mindie_linear_sums_only_its_ranks_chunks(converted_checkpoints, source_checkpoints, tp_size):
    """Stock computes a mindie Linear's weight_scale_bias from the rank's input slice (the ranks' partial
    outputs are summed after): the plugin sums the stored chunks of that slice, as the real 0.23 showed."""
    stand_ins.install("registry")
    try:
        linear_method, _ = registered("registry")
        ckpt = configure(converted_checkpoints["mindie"], tp_size)
        prefix = "model.layers.0.self_attn.o_proj"
        chunks = ckpt.tensors([f"{prefix}.scale_bias"])[f"{prefix}.scale_bias"]
        for rank in (0, tp_size - 1):
            layer = stand_ins.LinearLayer(linear_method(), SPEC.hidden, SPEC.hidden, True, tp_size, rank)
            layer.load(prefix, all_tensors(ckpt, prefix))
            layer.quant_method.process_weights_after_loading(layer)
            share = 16 // tp_size
            assert torch.equal(layer.weight_scale_bias.data, chunks[:, rank * share : (rank + 1) * share].sum(-1))
    finally:
        stand_ins.uninstall()
