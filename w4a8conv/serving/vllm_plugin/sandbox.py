"""The installed engine's W4A8 code run without a server: what a serving process would answer it, for one
parallel layout at a time. ``check-engine`` and ``make test-engine`` drive the engine through this.

vLLM's own FusedMoE weight loader and vllm-ascend's own method adapter and W4A8 methods run unchanged;
only what they ask of a running server is answered (the vLLM and Ascend configs, the tensor-parallel size,
no MC2 group), by replacing, while a :func:`serving` block runs, the getters the engine's modules imported.
A MoE layer is the layer vLLM keeps the experts' weights on, with its own ``weight_loader``, without the
model around it: ``RoutedExperts`` built by its own constructor where vLLM has it as a layer of its own
(0.24 on: the vllm-ascend 0.26 branch), else vLLM 0.23's ``FusedMoE``. Only the expert map is ours.
:func:`driveable` says why another release cannot be driven.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch


@dataclass
class Serving:
    """What a server would tell the engine: the description it loaded, its model directory, the layout."""

    description: dict = field(default_factory=dict)
    model: str = ""
    tp_size: int = 1
    expert_parallel: bool = False
    dynamic_eplb: bool = False
    mega_moe: bool = False
    mix_placement: bool = False
    on_npu: bool = False  # layers live on an NPU: the engine decides NZ itself, as on the device it serves on


class _QuantConfig:
    def __init__(self, state: Serving):
        self._state = state

    @property
    def quant_description(self) -> dict:
        return self._state.description

    @quant_description.setter
    def quant_description(self, value: dict) -> None:
        self._state.description = value

    def get_name(self) -> str:
        """The name of the config a server picks for the description: compressed-tensors' own where it says
        so (an unconverted compressed-tensors checkpoint), else msModelSlim's, which serves w4a8conv's outputs."""
        return self._state.description.get("ascend_quant_method") or "ascend"


def driveable() -> str | None:
    """Why the installed engine cannot be driven here, or None: vLLM and vllm-ascend (its W4A8 scheme
    registry) must import, and the layer vLLM keeps MoE weights on must load them itself. What else a newer
    release asks for shows when a layer is driven (``check_engine`` says so in one line)."""
    try:
        from vllm.model_executor.layers import fused_moe
        from vllm_ascend.quantization import method_adapters  # noqa: F401
        from vllm_ascend.quantization.methods import registry, w4a8  # noqa: F401
    except ImportError as e:
        return f"vLLM and vllm-ascend cannot be imported here ({e}); run it where the server runs"
    if not hasattr(_routed_experts_class() or getattr(fused_moe, "FusedMoE", None), "weight_loader"):
        return "this vLLM's MoE layer has no weight_loader (a release check-engine does not drive)"
    return None


@contextlib.contextmanager
def serving(state: Serving) -> Iterator[None]:
    """Answer what vllm-ascend's W4A8 code and the plugin ask of a server, as ``state`` says, while the
    block runs; the getters are restored after it."""
    import vllm.config
    import vllm_ascend.ascend_config
    import vllm_ascend.utils
    from vllm_ascend.quantization.methods import w4a8

    quant_config = _QuantConfig(state)

    def config() -> SimpleNamespace:  # read when asked: the state may change inside the block
        return SimpleNamespace(
            quant_config=quant_config,
            model_config=SimpleNamespace(model=state.model, revision=None),
            parallel_config=SimpleNamespace(enable_expert_parallel=state.expert_parallel),
            # main's V2 model runner turns dynamic EPLB off, which serves as the layout without it does
            use_v2_model_runner=False,
        )

    def ascend_config() -> SimpleNamespace:
        return SimpleNamespace(
            eplb_config=SimpleNamespace(dynamic_eplb=state.dynamic_eplb),
            dynamic_eplb=state.dynamic_eplb,
            enable_fused_mc2=1 if state.mega_moe else 0,
            mix_placement=state.mix_placement,
        )

    def no_mc2_group() -> None:
        raise AttributeError("no MC2 group outside a server")

    answers = {
        "get_current_vllm_config": config,
        "get_tensor_model_parallel_world_size": lambda: state.tp_size,
        "get_mc2_group": no_mc2_group,
        "get_ascend_config": ascend_config,
    }
    # The getters as the scheme modules imported them (one w4a8 module up to 0.27, a w4a8 package from 0.30 on)
    methods = [m for n, m in list(sys.modules.items()) if n.startswith(w4a8.__name__.rsplit(".", 1)[0] + ".")]
    replaced = [(m, name, answer) for m in methods for name, answer in answers.items() if name in vars(m)]
    replaced += [
        (vllm.config, "get_current_vllm_config", config),
        (vllm_ascend.ascend_config, "get_ascend_config", ascend_config),
    ]
    if not state.on_npu:  # NZ as on an A2/A3 device: every weight but fp32 (on the CPU the cast is an identity)
        replaced.append((vllm_ascend.utils, "_should_trans_nz", lambda weight: weight.dtype != torch.float32))
    saved = [(module, name, module.__dict__.get(name, _ABSENT)) for module, name, _ in replaced]
    for module, name, value in replaced:
        setattr(module, name, value)
    with _format_casts_on_the_cpu():
        try:
            yield
        finally:
            for module, name, value in saved:
                if value is _ABSENT:
                    delattr(module, name)
                else:
                    setattr(module, name, value)


_ABSENT = object()


@contextlib.contextmanager
def _format_casts_on_the_cpu() -> Iterator[None]:
    """torch_npu's NZ cast on a CPU tensor, where the real torch_npu has no NPU to cast on: the values are
    what they were (NZ is a storage layout), as the canary compares them."""
    torch_npu = sys.modules.get("torch_npu")
    cast = getattr(torch_npu, "npu_format_cast", None)
    if cast is None or getattr(cast, "_w4a8conv_cpu", False):
        yield
        return

    def npu_format_cast(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tensor.device.type == "cpu":
            try:
                return cast(tensor, *args, **kwargs)
            except Exception:  # a real torch_npu on a CPU tensor
                return tensor
        return cast(tensor, *args, **kwargs)

    npu_format_cast._w4a8conv_cpu = True
    torch_npu.npu_format_cast = npu_format_cast
    try:
        yield
    finally:
        torch_npu.npu_format_cast = cast


def loader_only_fused_moe(
    quant_method: Any,
    sizes: tuple[int, int, int],
    local_experts: list[int],
    tp_size: int,
    tp_rank: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """The layer vLLM keeps MoE weights on, of ``sizes`` (global experts, hidden, moe_intermediate) holding
    ``local_experts``, with its own weight_loader and expert map, its parameters created by vllm-ascend's
    adapter around ``quant_method`` in ``dtype``, at MoE tensor parallelism ``tp_size`` (1 with expert
    parallelism): vLLM's ``RoutedExperts`` where it has one (0.24 on), else its ``FusedMoE``."""
    if _routed_experts_class() is not None:
        return _routed_experts(quant_method, sizes, local_experts, tp_size, tp_rank, dtype)
    return _fused_moe_class()(quant_method, sizes, local_experts, tp_size, tp_rank, dtype)


def _routed_experts(
    quant_method: Any, sizes: tuple[int, int, int], local_experts: list[int], tp_size: int, tp_rank: int, dtype: Any
) -> torch.nn.Module:
    """vLLM's own ``RoutedExperts``, built by its own constructor: it asks its quant config for the method
    (here vllm-ascend's adapter around ``quant_method``), and the adapter creates the parameters with the
    layer's own ``weight_loader``. Only the expert map is ours: which experts this rank holds."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
    from vllm_ascend.quantization import method_adapters

    experts, hidden, intermediate = sizes
    parallel = FusedMoEParallelConfig(
        tp_size=tp_size,
        pcp_size=1,
        dp_size=1,
        ep_size=1,
        tp_rank=tp_rank,
        pcp_rank=0,
        dp_rank=0,
        ep_rank=0,
        sp_size=1,
        use_ep=False,
        all2all_backend="naive",
        enable_eplb=False,
    )
    moe_config = FusedMoEConfig(
        num_experts=experts,
        experts_per_token=1,
        hidden_dim=hidden,
        intermediate_size=intermediate,
        num_local_experts=len(local_experts),
        num_logical_experts=experts,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.Default,
        moe_parallel_config=parallel,
        in_dtype=dtype,
    )
    expert_map = _expert_map(experts, local_experts)
    experts_held = SimpleNamespace(
        local_num_experts=len(local_experts),
        placement_strategy="linear",
        expert_map=expert_map,
        expert_mask=None,
        routing_tables=None,
        map_global_to_local=lambda g: int(expert_map[g]),
    )

    class QuantConfig:  # what RoutedExperts asks its quant config: the method, its name, no online quantization
        online_quantization_config = None

        def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
            return method_adapters.AscendFusedMoEMethod(quant_method, layer.moe_config)

        def get_name(self) -> str:
            return "ascend"

    routed_experts = _routed_experts_class()
    return routed_experts("w4a8conv-check-engine", dtype, moe_config, QuantConfig(), expert_map_manager=experts_held)


def _expert_map(experts: int, local_experts: list[int]) -> torch.Tensor:
    """Each global expert's index on this rank, -1 where another rank holds it (vLLM's expert map)."""
    expert_map = torch.full((experts,), -1, dtype=torch.int32)
    expert_map[local_experts] = torch.arange(len(local_experts), dtype=torch.int32)
    return expert_map


def moe_layer_class() -> type:
    """The class of :func:`loader_only_fused_moe`'s layers: vLLM's RoutedExperts, or a FusedMoE of its own."""
    return _routed_experts_class() or _fused_moe_class()


def _routed_experts_class() -> type | None:
    """vLLM's RoutedExperts where it is a layer of its own (0.24 on; in 0.23 the name is FusedMoE's alias)."""
    from vllm.model_executor.layers import fused_moe

    routed = getattr(fused_moe, "RoutedExperts", None)
    return routed if routed is not None and routed is not getattr(fused_moe, "FusedMoE", None) else None


def _fused_moe_class() -> type:
    """vLLM 0.23's FusedMoE with the model around it left out (imported when first asked)."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE
    from vllm_ascend.quantization import method_adapters

    class LoaderOnlyFusedMoE(FusedMoE):
        """vLLM's FusedMoE with its own weight_loader and expert map, without the model around it."""

        def __init__(self, quant_method, sizes, local_experts, tp_size, tp_rank, dtype=torch.bfloat16):
            experts, hidden, intermediate = sizes
            torch.nn.Module.__init__(self)
            self.quant_config = None
            self.rocm_aiter_fmoe_enabled = False
            self.moe_parallel_config = SimpleNamespace(tp_size=tp_size, tp_rank=tp_rank, ep_size=1, ep_rank=0)
            self.moe_config = SimpleNamespace(is_act_and_mul=True, moe_parallel_config=self.moe_parallel_config)
            expert_map = _expert_map(experts, local_experts)
            self._expert_map = expert_map
            self.expert_map_manager = SimpleNamespace(map_global_to_local=lambda g: int(expert_map[g]))
            adapter = method_adapters.AscendFusedMoEMethod.__new__(method_adapters.AscendFusedMoEMethod)
            adapter.quant_method = quant_method
            self.quant_method = adapter
            adapter.create_weights(
                self, len(local_experts), hidden, intermediate // tp_size, dtype, weight_loader=self.weight_loader
            )

    global _LOADER_ONLY
    if _LOADER_ONLY is None:
        _LOADER_ONLY = LoaderOnlyFusedMoE
    return _LOADER_ONLY


_LOADER_ONLY: type | None = None


def loader_only_linear(
    kind: str, quant_method: Any, in_features: int, out_features: int, tp_size: int, tp_rank: int, dtype: torch.dtype
) -> torch.nn.Module:
    """vLLM's RowParallelLinear (``kind`` "row") or ColumnParallelLinear with its own weight_loader,
    without the model around it, its parameters created by vllm-ascend's adapter around ``quant_method``."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm_ascend.quantization import method_adapters

    cls = RowParallelLinear if kind == "row" else ColumnParallelLinear
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.tp_size, layer.tp_rank, layer.prefix = tp_size, tp_rank, "w4a8conv-check-engine"
    layer.output_sizes = [out_features]
    if kind == "row":
        layer.input_is_parallel = True
    adapter = method_adapters.AscendLinearMethod.__new__(method_adapters.AscendLinearMethod)
    adapter.quant_method = quant_method
    layer.quant_method = adapter
    in_part = in_features // tp_size if kind == "row" else in_features
    out_parts = [out_features] if kind == "row" else [out_features // tp_size]
    adapter.create_weights(
        layer, in_part, out_parts, in_features, out_features, dtype, weight_loader=layer.weight_loader
    )
    return layer
