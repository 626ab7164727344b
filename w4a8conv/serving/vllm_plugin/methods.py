"""The plugin's Linear and FusedMoE methods, derived from the installed release's W4A8_DYNAMIC methods."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ...formats.scales import sum_scale_bias_chunks
from ...names import SCALE_BIAS_CHUNKS
from . import canary_check as canary
from .api import VllmAscendApi
from .checks import (
    check_groups_per_rank,
    check_mix_placement,
    check_moe_tensor_parallel,
    check_serving_dtype,
    check_words_per_rank,
    checkpoint_section,
    refuse_scale_bias_loading,
    scale_bias_loading_problem,
)
from .log import log

_VLLM_GROUP_SCALES = "group"  # vLLM's FusedMoeWeightScaleSupported.GROUP.value


def _follow_create_weights(adapter: type) -> None:
    """After an adapter registers a method's parameters, let a prepacked method annotate them."""
    original = adapter.create_weights
    if getattr(original, "_w4a8conv", False):
        return

    @functools.wraps(original)
    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, layer, *args, **kwargs)
        annotate = getattr(self.quant_method, "annotate_parameters", None)
        if annotate is not None:
            annotate(layer)

    create_weights._w4a8conv = True
    adapter.create_weights = create_weights


def _nz(api: VllmAscendApi, words: torch.Tensor) -> torch.Tensor:
    """Cast packed int32 words to NZ as upstream does: on their int8 view, then view back as int32."""
    return api.nz_cast(words.view(torch.int8)).view(torch.int32)


def _widen_scale_bias(layer: torch.nn.Module) -> None:
    """A row-parallel Linear keeps 16 scale_bias chunks; releases whose adapter does not pass
    ``layer_type`` to ``get_pergroup_param`` created it with one, so recreate it."""
    old = layer.scale_bias
    new = torch.nn.Parameter(torch.empty(old.shape[0], SCALE_BIAS_CHUNKS, dtype=old.dtype), requires_grad=False)
    for attr in ("weight_loader", "output_dim"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    layer.register_parameter("scale_bias", new)


def _rank_chunks(layer: torch.nn.Module, bias: torch.Tensor) -> torch.Tensor:
    """A row-parallel rank's scale_bias chunks: those of its slice of the input (its loader's ``tp_rank``)."""
    tp_size, tp_rank = int(getattr(layer, "tp_size", 1)), int(getattr(layer, "tp_rank", 0))
    if bias.shape[1] == 1 or tp_size == 1:
        return bias
    check_moe_tensor_parallel(tp_size, "a row-parallel W4A8 Linear's tensor-parallel size")
    share = bias.shape[1] // tp_size
    return bias[:, tp_rank * share : (tp_rank + 1) * share]


def _split_for_eplb(layer: torch.nn.Module) -> None:
    """Dynamic expert load balancing moves single experts: upstream keeps per-expert lists instead."""
    for name in ("w13_weight", "w2_weight"):  # int8 views, as upstream's lists (apply views them as int32)
        setattr(layer, f"{name}_list", [w.view(torch.int8).clone() for w in getattr(layer, name).data.unbind(0)])
    for name in ("w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias"):
        setattr(layer, f"{name}_list", [t.clone() for t in getattr(layer, name).data.unbind(0)])
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias"):
        delattr(layer, name)


def _build_mega_moe_lists(layer: torch.nn.Module) -> None:
    """MegaMoE (0.25.1rc1 and later, ``enable_fused_mc2=1``) reads per-expert lists: the int8 NZ weights,
    the int64 scales flattened and the biases in fp32, as upstream builds them; the stacked tensors go."""
    for name in ("w13", "w2"):
        weights = getattr(layer, f"{name}_weight").data.unbind(0)
        setattr(layer, f"cann_mega_moe_{name}_weight_list", [w.view(torch.int8).clone() for w in weights])
        scales = getattr(layer, f"{name}_weight_scale").data.unbind(0)
        setattr(layer, f"cann_mega_moe_{name}_weight_scale_list", [t.reshape(-1) for t in scales])
        biases = getattr(layer, f"{name}_scale_bias").data.unbind(0)
        setattr(layer, f"cann_mega_moe_{name}_scale_bias_list", [t.reshape(-1).to(torch.float32) for t in biases])
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias"):
        delattr(layer, name)


def _fit_scale_bias_loader(layer: torch.nn.Module, tp_size: int) -> tuple[int, int] | None:
    """Make sure the MoE layer's own loader gives this rank its w2_scale_bias chunks, before any weight loads,
    by loading a marked tensor (:func:`scale_bias_loading_problem`). vLLM 0.27 and later copy every w2
    tensor named ``*bias`` whole: there the plugin hands the loader this rank's chunks, checks again, and
    returns (rank, tp size) so that the canary's layers load the same way. Anything else is refused."""
    rank, expert = _moe_tp_rank(layer), canary.local_expert_zero(layer)
    problem = scale_bias_loading_problem(layer.w2_scale_bias, tp_size, rank, expert)
    if problem is None:
        return None
    if tp_size > 1:
        _hand_rank_its_chunks(layer.w2_scale_bias, rank, tp_size)
        if scale_bias_loading_problem(layer.w2_scale_bias, tp_size, rank, expert) is None:
            _announce_handed_chunks()
            return rank, tp_size
    refuse_scale_bias_loading(problem, tp_size, rank)


def _hand_rank_its_chunks(param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> None:
    """Wrap ``param``'s loader so that it is given this rank's scale_bias chunks, not all 16, for a loader
    that copies what it is given whole."""
    load, share = param.weight_loader, SCALE_BIAS_CHUNKS // tp_size

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if loaded_weight.shape[-1] == SCALE_BIAS_CHUNKS:
            loaded_weight = loaded_weight[..., tp_rank * share : (tp_rank + 1) * share]
        return load(param, loaded_weight, *args, **kwargs)

    param.weight_loader = weight_loader


@functools.cache
def _announce_handed_chunks() -> None:
    log.info(
        "w4a8conv: this vLLM's MoE loader copies w2 *bias tensors whole; each rank is handed its scale_bias chunks"
    )


def _moe_tp_rank(layer: torch.nn.Module) -> int:
    """This rank's MoE tensor-parallel rank, as the layer's loader reads it (vLLM 0.23's FusedMoE keeps its
    parallel config, RoutedExperts its MoE config)."""
    for holder in (getattr(layer, "moe_parallel_config", None), getattr(layer, "moe_config", None), layer):
        rank = getattr(holder, "tp_rank", None)
        if isinstance(rank, int):
            return rank
    return 0


@functools.cache
def _announce_once() -> None:
    log.info("w4a8conv: W4A8 MoE weights arrived prepacked; skipping repacking, scale encoding and bias sums")


def build_methods(api: VllmAscendApi) -> tuple[type | None, type]:
    """The plugin's Linear and MoE methods, derived from this release's W4A8_DYNAMIC methods (no Linear on main)."""
    linear = _linear_method(api) if api.linear_method is not None else None
    return linear, _moe_method(api)


def _linear_method(api: VllmAscendApi) -> type:

    class PrepackedW4A8LinearMethod(api.linear_method):
        """A W4A8_DYNAMIC Linear whose tensors w4a8conv already processed."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.canary, self.engine_method = canary.prepare("linear", api.version, api.linear_method)

        def get_weight(self, input_size: int, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
            check_serving_dtype(params_dtype)
            self.params_dtype = params_dtype
            return {"weight": torch.empty(input_size, output_size // 8, dtype=torch.int32)}

        def get_pergroup_param(self, input_size, output_size, params_dtype, layer_type=None) -> dict[str, Any]:
            chunks = SCALE_BIAS_CHUNKS if layer_type == "row" else 1
            return {
                "weight_scale_second": torch.empty(input_size // self.group_size, output_size, dtype=torch.float32),
                "scale_bias": torch.empty(output_size, chunks, dtype=torch.float32),
            }

        def annotate_parameters(self, layer: torch.nn.Module) -> None:
            # Stored [in, out/8] and [in/g, out]: output on dim 1, 8 outputs per int32 word.
            layer.weight.input_dim, layer.weight.output_dim = 0, 1
            layer.weight.packed_dim, layer.weight.packed_factor = 1, 8
            layer.weight_scale_second.input_dim, layer.weight_scale_second.output_dim = 0, 1
            if hasattr(layer, "input_is_parallel") and layer.scale_bias.shape[1] != SCALE_BIAS_CHUNKS:
                _widen_scale_bias(layer)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if self.canary is not None:
                check = None
                if canary.linear_canary_matches(self.canary, layer):
                    check = functools.partial(
                        canary.check_linear, self.canary, self.engine_method, layer, self.params_dtype, self.process
                    )
                canary.run_once("linear", self.canary, check)
            self.process(layer)

        def process(self, layer: torch.nn.Module) -> None:
            """What stays to do at load: NZ, and upstream's names for the bias."""
            layer.weight.data = _nz(api, layer.weight.data)
            bias = layer.scale_bias.data
            if getattr(self, "new_quant_version", False):  # 1.0.0 source: upstream keeps scale_bias
                layer.scale_bias.data = bias.flatten() if bias.shape[1] == 1 else bias.contiguous()
            else:  # mindie source: upstream computes weight_scale_bias [out] from this rank's input slice
                del layer.scale_bias
                bias = _rank_chunks(layer, bias) if hasattr(layer, "input_is_parallel") else bias
                layer.register_parameter("weight_scale_bias", torch.nn.Parameter(bias.sum(-1), requires_grad=False))

    return PrepackedW4A8LinearMethod


def _moe_method(api: VllmAscendApi) -> type:
    class PrepackedW4A8FusedMoEMethod(api.moe_method):
        """A W4A8_DYNAMIC FusedMoE layer whose expert tensors w4a8conv already processed."""

        def __init__(self, *args: Any, **kwargs: Any):
            check_mix_placement(api.mix_placement())
            super().__init__(*args, **kwargs)
            self.canary, self.engine_method = canary.prepare("moe", api.version, api.moe_method)
            if not hasattr(self, "group_size"):  # main keeps none: it serves per-channel weights only
                self.group_size = checkpoint_section().get("group_size", 0)
            check_moe_tensor_parallel(self.tp_size)

        def get_weight(self, num_experts, intermediate_size_per_partition, hidden_sizes, params_dtype):
            check_serving_dtype(params_dtype)
            check_words_per_rank(intermediate_size_per_partition, self.tp_size)
            check_groups_per_rank(self.group_size, intermediate_size_per_partition, self.tp_size)
            self.canary_shape = (intermediate_size_per_partition, hidden_sizes, params_dtype)
            e, i, h = num_experts, intermediate_size_per_partition, hidden_sizes
            return {
                "w13_weight": torch.empty(e, h, 2 * i // 8, dtype=torch.int32),
                "w2_weight": torch.empty(e, i, h // 8, dtype=torch.int32),
            }

        def get_dynamic_quant_param(self, num_experts, intermediate_size_per_partition, hidden_sizes, params_dtype):
            e, i, h, g = num_experts, intermediate_size_per_partition, hidden_sizes, self.group_size
            return {
                "w13_weight_scale": torch.empty(e, h // g if g else 1, 2 * i, dtype=torch.int64),
                "w2_weight_scale": torch.empty(e, i // g if g else 1, h, dtype=torch.int64),
                "w13_scale_bias": torch.empty(e, 2 * i, 1, dtype=torch.float32),
                "w2_scale_bias": torch.empty(e, h, SCALE_BIAS_CHUNKS // self.tp_size, dtype=torch.float32),
            }

        def annotate_parameters(self, layer: torch.nn.Module) -> None:
            # Weights and scales are stored [in, out]: vLLM's FusedMoE loader then splits w13 on
            # dim 1 (its output) and w2 on dim 0 (its input) for tensor parallelism. The per-channel
            # w2 scale [1, H] is whole on every rank.
            for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
                getattr(layer, name).is_transposed = True
            # Loaded the way vLLM loads group scales (split by rank on the sharded dim), whatever the
            # release marked: the mid-2025 one marked only *_second tensors, so its loader copied w2's
            # scales and scale_bias whole, which cannot work with MoE tensor parallelism.
            sliced = ["w13_scale_bias", "w2_scale_bias"]
            sliced += ["w13_weight_scale", "w2_weight_scale"] if self.group_size > 0 else []
            for name in sliced:
                getattr(layer, name).quant_method = _VLLM_GROUP_SCALES
            if not canary.is_canary_layer(layer):
                self.w2_chunks_handed = _fit_scale_bias_loader(layer, self.tp_size)
            elif getattr(self, "w2_chunks_handed", None) is not None:  # the canary's layer loads as the serving one
                _hand_rank_its_chunks(layer.w2_scale_bias, *self.w2_chunks_handed)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if self.canary is not None:
                check = functools.partial(
                    canary.check_moe, self.canary, self.engine_method, layer, self.canary_shape, self.process
                )
                canary.run_once("moe", self.canary, check)
            self.process(layer)

        def process(self, layer: torch.nn.Module) -> None:
            """What stays to do at load: this rank's bias sums, NZ, and the names and lists this release reads."""
            _announce_once()
            # This rank's scale_bias chunks (all 16 with expert parallelism) sum to its bias, as upstream sums them.
            layer.w13_scale_bias.data = sum_scale_bias_chunks(layer.w13_scale_bias.data)
            layer.w2_scale_bias.data = sum_scale_bias_chunks(layer.w2_scale_bias.data)
            if self.group_size == 0:
                layer.w13_weight_scale.data = layer.w13_weight_scale.data.squeeze(1)
            layer.w13_weight.data = _nz(api, layer.w13_weight.data)
            layer.w2_weight.data = _nz(api, layer.w2_weight.data)
            # Per-expert lists: dynamic EPLB (0.23 on), or on main the v2 model runner with EPLB.
            if getattr(self, "use_expert_weight_list", getattr(self, "dynamic_eplb", False)):
                _split_for_eplb(layer)
                return
            if api.mega_moe():
                _build_mega_moe_lists(layer)
                return
            w13_name, w2_name = api.moe_scale_names
            if w13_name != "w13_weight_scale":
                for old, new in (("w13_weight_scale", w13_name), ("w2_weight_scale", w2_name)):
                    layer.register_parameter(new, torch.nn.Parameter(getattr(layer, old).data, requires_grad=False))
                    delattr(layer, old)

    return PrepackedW4A8FusedMoEMethod
