"""Stand-ins for the few vLLM / vllm-ascend / torch_npu entry points the serving plugin touches.

They reproduce, from the vllm-ascend 0.23 sources, main's (182b75ea84, "main" below) and the mid-2025
release the project was seeded from, only the behaviour the plugin relies on:

* the adapters' ``create_weights``: which parameters a method's ``get_*`` dicts become, and which
  loader attributes (``input_dim``, ``output_dim``, ``quant_method``) they get;
* vLLM's FusedMoE weight loader: a rank takes its 1/tp slice of w13 on the output dim (w1 in the
  first half, w3 in the second) and of w2 on the input dim, the dims swapped for ``is_transposed``
  parameters; per-channel w2 scales are loaded whole; experts outside this rank are skipped;
* vLLM's column / row parallel Linear loaders: narrow ``output_dim`` / ``input_dim`` by rank;
* main's W4A8 MoE method: no Linear scheme beside it, no ``group_size`` attribute, per-group
  weights refused in ``__init__``, ``use_expert_weight_list`` for dynamic EPLB or the v2 runner
  with EPLB;
* the two registration mechanisms (scheme registry, ``SUPPORT_ASCEND_QUANTIZER_TYPE``), the 0.23
  registry refusing a second registration of a quant type;
* ``vllm.config.get_current_vllm_config()``, through which both releases' methods read the
  checkpoint's description;
* ``maybe_trans_nz`` / ``npu_format_cast``, which record the cast and keep the values.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import torch

CHANNEL, GROUP = "channel", "group"
nz_casts: list[tuple[str, tuple[int, ...]]] = []


class Config:
    """What upstream methods read from the vLLM config: the description and the parallel layout."""

    description: ClassVar[dict] = {}
    tp_size = 1
    enable_fused_mc2 = 0
    use_expert_weight_list = False  # main: dynamic EPLB, or the v2 model runner with EPLB
    version: str | None = None  # vllm_ascend._version.version; None: each release's own below
    mega_moe_supported: str | None = None  # the module that says so (0.25.1rc1+), None before


def get_ascend_config() -> SimpleNamespace:
    return SimpleNamespace(enable_fused_mc2=Config.enable_fused_mc2)


def _set_attrs(param: torch.nn.Parameter, attrs: dict) -> None:
    for key, value in attrs.items():
        assert not hasattr(param, key), f"overwriting {key}"  # as vLLM's set_weight_attrs
        setattr(param, key, value)


def _register(layer, name: str, value: torch.Tensor, *attrs: dict) -> torch.nn.Parameter:
    """Register ``value`` as a frozen parameter of ``layer`` and set each dict of attributes in turn."""
    param = torch.nn.Parameter(value, requires_grad=False)
    layer.register_parameter(name, param)
    for each in attrs:
        _set_attrs(param, each)
    return param


def get_current_vllm_config() -> SimpleNamespace:
    return SimpleNamespace(quant_config=SimpleNamespace(quant_description=Config.description))


class UpstreamLinearMethod:
    def __init__(self):
        description = get_current_vllm_config().quant_config.quant_description
        self.group_size = description.get("group_size", 256)
        self.new_quant_version = description.get("version", "0") == "1.0.0"


class UpstreamMoEMethod:
    def __init__(self):
        description = get_current_vllm_config().quant_config.quant_description
        self.group_size = description.get("group_size", 256)
        self.new_quant_version = description.get("version", "0") == "1.0.0"
        self.tp_size = Config.tp_size


class UpstreamMainMoEMethod:
    """main's AscendW4A8DynamicFusedMoEMethod.__init__, as far as the plugin relies on it."""

    def __init__(self):
        description = get_current_vllm_config().quant_config.quant_description
        if description.get("group_size", 0) > 0:
            raise ValueError(
                "The current weights use Per-Group quantization, which is no longer supported. Please "
                "switch to Per-Channel quantized weights."
            )
        self.tp_size = Config.tp_size
        self.dynamic_eplb = False
        self.use_expert_weight_list = Config.use_expert_weight_list


class LinearAdapter:
    passes_layer_type = True  # 0.23 tells get_pergroup_param the layer type; the mid-2025 release did not

    def __init__(self, scheme):
        self.quant_method = scheme

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra
    ):
        out = sum(output_partition_sizes)
        for name, value in self.quant_method.get_weight(input_size_per_partition, out, params_dtype).items():
            _register(layer, name, value, {"input_dim": 1, "output_dim": 0}, extra)
        layer_type = {"layer_type": "row" if layer.row_parallel else "others"} if self.passes_layer_type else {}
        for name, value in self.quant_method.get_pergroup_param(
            input_size_per_partition, out, params_dtype, **layer_type
        ).items():
            param = _register(layer, name, value, {"output_dim": 0}, extra)
            if "weight_scale_second" in name:
                param.input_dim = 1

    def process_weights_after_loading(self, layer):
        self.quant_method.process_weights_after_loading(layer)


class MoEAdapter:
    marks_scale_bias_and_scales_as_group = True

    def __init__(self, scheme):
        self.quant_method = scheme

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        for name, value in self.quant_method.get_weight(
            num_experts, intermediate_size_per_partition, hidden_size, params_dtype
        ).items():
            _register(layer, name, value, extra)
        extra = {**extra, "quant_method": CHANNEL}
        per_group = ["weight_scale_second", "weight_offset_second"]
        if self.marks_scale_bias_and_scales_as_group:  # 0.23 and main; the mid-2025 release marked only *_second
            per_group += ["scale_bias"] + (
                ["weight_scale", "weight_offset"] if getattr(self.quant_method, "group_size", 0) > 0 else []
            )
        for name, value in self.quant_method.get_dynamic_quant_param(
            num_experts, intermediate_size_per_partition, hidden_size, params_dtype
        ).items():
            param = _register(layer, name, value, extra)
            if any(field in name for field in per_group):  # main tests hasattr(group_size) the same way
                param.quant_method = GROUP

    def process_weights_after_loading(self, layer):
        self.quant_method.process_weights_after_loading(layer)


class FusedMoELayer(torch.nn.Module):
    """vLLM's FusedMoE as far as loading goes: its parameters and weight_loader."""

    def __init__(
        self,
        method,
        local_experts: list[int],
        hidden: int,
        intermediate: int,
        tp_size: int,
        tp_rank: int,
        params_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.expert_map = {e: i for i, e in enumerate(local_experts)}
        self.quant_method = MoEAdapter(method)
        self.quant_method.create_weights(
            self, len(local_experts), hidden, intermediate // tp_size, params_dtype, weight_loader=self.weight_loader
        )

    def weight_loader(self, param, loaded, weight_name: str, shard_id: str, expert_id: int) -> None:
        if expert_id not in self.expert_map:
            return  # another rank's expert
        expert = param.data[self.expert_map[expert_id]]
        shard_dim = {"w1": 0, "w3": 0, "w2": 1}[shard_id]
        if getattr(param, "is_transposed", False):
            shard_dim = int(not shard_dim)
        if "scale" in weight_name and getattr(param, "quant_method", None) == CHANNEL and shard_id == "w2":
            expert.copy_(loaded.reshape(expert.shape))
            return
        if shard_id == "w2":
            size = expert.shape[shard_dim]
            expert.copy_(loaded.narrow(shard_dim, size * self.tp_rank, size))
            return
        size = expert.shape[shard_dim] // 2
        target = expert.narrow(shard_dim, 0 if shard_id == "w1" else size, size)
        target.copy_(loaded.narrow(shard_dim, size * self.tp_rank, size))

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """vLLM's expert params mapping: experts.E.gate_proj.X -> w13_X (w1), up -> w13_X (w3), down -> w2_X."""
        for name, tensor in tensors.items():
            if not name.startswith(prefix + "."):
                continue
            expert, proj, suffix = name[len(prefix) + 1 :].split(".", 2)
            param_name, shard_id = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}[
                proj
            ]
            param = getattr(self, f"{param_name}_{suffix}")
            param.weight_loader(param, tensor, f"{param_name}_{suffix}", shard_id=shard_id, expert_id=int(expert))


class LinearLayer(torch.nn.Module):
    """vLLM's Column/RowParallelLinear as far as loading goes."""

    def __init__(
        self,
        method,
        in_features: int,
        out_features: int,
        row_parallel: bool,
        tp_size: int,
        tp_rank: int,
        params_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.row_parallel, self.tp_rank = row_parallel, tp_rank
        if row_parallel:
            self.input_is_parallel = True  # as vLLM's RowParallelLinear
        self.quant_method = LinearAdapter(method)
        in_part = in_features // tp_size if row_parallel else in_features
        out_part = out_features if row_parallel else out_features // tp_size
        self.quant_method.create_weights(
            self, in_part, [out_part], in_features, out_features, params_dtype, weight_loader=self.weight_loader
        )

    def weight_loader(self, param, loaded) -> None:
        dim = getattr(param, "input_dim" if self.row_parallel else "output_dim", None)
        if dim is not None and not (self.row_parallel and param.dim() <= dim):
            size = param.shape[dim]
            loaded = loaded.narrow(dim, size * self.tp_rank, size)
        param.data.copy_(loaded)

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name.startswith(prefix + "."):
                param = getattr(self, name[len(prefix) + 1 :])
                param.weight_loader(param, tensor)


def maybe_trans_nz(tensor: torch.Tensor) -> torch.Tensor:
    nz_casts.append((str(tensor.dtype), tuple(tensor.shape)))
    return tensor


def install(release: str) -> None:
    """Put stand-in ``vllm_ascend`` modules of ``release`` ("registry", "main" or "quantizer") in sys.modules."""
    nz_casts.clear()
    modules = {}

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        modules[name] = mod
        return mod

    LinearAdapter.passes_layer_type = release != "quantizer"
    MoEAdapter.marks_scale_bias_and_scales_as_group = release != "quantizer"
    module("vllm")
    module("vllm.config", get_current_vllm_config=get_current_vllm_config)
    module("vllm_ascend")
    default = {"registry": "0.23.0", "main": "0.19.1rc2.dev1637+g182b75ea8", "quantizer": "0.9.1"}[release]
    module("vllm_ascend._version", version=Config.version or default)
    module("vllm_ascend.quantization")
    if release in ("registry", "main"):
        schemes: dict = {}

        def register_scheme(quant_type, layer_type):
            def decorator(cls):
                assert (quant_type, layer_type) not in schemes
                schemes[(quant_type, layer_type)] = cls
                return cls

            return decorator

        module("vllm_ascend.quantization.methods")
        module(
            "vllm_ascend.quantization.methods.registry",
            register_scheme=register_scheme,
            get_scheme_class=lambda q, t: schemes.get((q, t)),
            schemes=schemes,
        )
        if release == "main":  # the W4A8_DYNAMIC Linear scheme is gone
            module("vllm_ascend.quantization.methods.w4a8", AscendW4A8DynamicFusedMoEMethod=UpstreamMainMoEMethod)
        else:
            module(
                "vllm_ascend.quantization.methods.w4a8",
                AscendW4A8DynamicLinearMethod=UpstreamLinearMethod,
                AscendW4A8DynamicFusedMoEMethod=UpstreamMoEMethod,
            )
        module(
            "vllm_ascend.quantization.method_adapters",
            AscendLinearMethod=LinearAdapter,
            AscendFusedMoEMethod=MoEAdapter,
        )
        module("vllm_ascend.utils", maybe_trans_nz=maybe_trans_nz)
        module("vllm_ascend.ascend_config", get_ascend_config=get_ascend_config)
        module("vllm_ascend.ascend_forward_context")
        if Config.mega_moe_supported:
            modules[Config.mega_moe_supported]._MEGA_MOE_SUPPORTED = True
    else:

        class VLLMAscendQuantizer:
            pass

        module(
            "vllm_ascend.quantization.quantizer",
            VLLMAscendQuantizer=VLLMAscendQuantizer,
            SUPPORT_ASCEND_QUANTIZER_TYPE={},
        )
        module(
            "vllm_ascend.quantization.quant_config", AscendLinearMethod=LinearAdapter, AscendFusedMoEMethod=MoEAdapter
        )
        module(
            "vllm_ascend.quantization.w4a8_dynamic",
            AscendW4A8DynamicLinearMethod=UpstreamLinearMethod,
            AscendW4A8DynamicFusedMoEMethod=UpstreamMoEMethod,
        )
    for name, mod in modules.items():
        sys.modules[name] = mod


def uninstall() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "vllm_ascend")]:
        del sys.modules[name]
    for adapter in (LinearAdapter, MoEAdapter):  # undo the plugin's create_weights wrapper
        if getattr(adapter.create_weights, "_w4a8conv", False):
            adapter.create_weights = adapter.create_weights.__wrapped__
