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

import numpy as np
import torch

from w4a8conv.experts import ROLE_OF
from w4a8conv.serving.vllm_plugin import canary_check as canary

from .upstream_reference import emulate_int4pack

CHANNEL, GROUP = "channel", "group"
nz_casts: list[tuple[str, tuple[int, ...]]] = []


class Config:
    """What upstream methods read from the vLLM config: the description and the parallel layout."""

    description: ClassVar[dict] = {}
    tp_size = 1
    enable_fused_mc2 = 0
    mix_placement = False  # shared experts loaded among the routed ones
    use_expert_weight_list = False  # main: dynamic EPLB, or the v2 model runner with EPLB
    version: str | None = None  # vllm_ascend._version.version; None: each release's own below
    expert_parallel = False
    dynamic_eplb = False
    mutation: str | None = None  # one step of the engine's processing done otherwise (see _mutated)
    release = "registry"
    model_path: object = None  # the served checkpoint's directory
    mega_moe_supported: str | None = None  # the module that says so (0.25.1rc1+), None before


def get_ascend_config() -> SimpleNamespace:
    return SimpleNamespace(enable_fused_mc2=Config.enable_fused_mc2, mix_placement=Config.mix_placement)


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


class _QuantConfig:
    """The quant config upstream methods read their description from (one per process, as in a server)."""

    @property
    def quant_description(self) -> dict:
        return Config.description

    @quant_description.setter
    def quant_description(self, value: dict) -> None:
        Config.description = value


class _ModelConfig:
    @property
    def model(self) -> str:
        return str(Config.model_path)


_VLLM_CONFIG = SimpleNamespace(quant_config=_QuantConfig(), model_config=_ModelConfig())


def get_current_vllm_config() -> SimpleNamespace:
    return _VLLM_CONFIG


def _fp32_bits_as_int64(scale: torch.Tensor) -> torch.Tensor:
    """fp32 values as the int64 the W4A8 kernels take: the bit pattern zero-extended."""
    bits = scale.to(torch.float32).contiguous().numpy().view(np.uint32).astype(np.int64)
    return torch.from_numpy(bits)


def _mutated(step: str) -> bool:
    return Config.mutation == step


class UpstreamLinearMethod:
    """vllm-ascend 0.23's AscendW4A8DynamicLinearMethod, re-told: parameters, processing, names."""

    def __init__(self):
        description = get_current_vllm_config().quant_config.quant_description
        self.group_size = description.get("group_size", 256)
        self.new_quant_version = description.get("version", "0") == "1.0.0"

    def get_weight(self, input_size, output_size, params_dtype):
        if self.new_quant_version:
            return {
                "weight": torch.empty(output_size // 2, input_size, dtype=torch.int8),
                "_packed_dim": 0,
                "_packed_factor": 2,
            }
        return {"weight": torch.empty(output_size, input_size, dtype=torch.int8)}

    def get_pergroup_param(self, input_size, output_size, params_dtype, layer_type=None):
        groups = input_size // self.group_size
        params = {
            "weight_scale": torch.empty(output_size, 1, dtype=params_dtype),
            "weight_offset": torch.empty(output_size, 1, dtype=params_dtype),
            "weight_scale_second": torch.empty(output_size, groups, dtype=params_dtype),
            "weight_offset_second": torch.empty(output_size, groups, dtype=params_dtype),
        }
        if self.new_quant_version:
            params["scale_bias"] = torch.empty(output_size, 16 if layer_type == "row" else 1, dtype=torch.float32)
        return params

    def process_weights_after_loading(self, layer):
        weight = maybe_trans_nz(layer.weight.data.transpose(0, 1).contiguous())  # [in, out] (or out/2)
        scale = layer.weight_scale.data.flatten().to(torch.float32)
        second = layer.weight_scale_second.data.transpose(0, 1).contiguous()  # [groups, out]
        layer.weight_scale.data, layer.weight_offset.data = scale, layer.weight_offset.data.flatten()
        layer.weight_scale_second.data = scale * second
        if self.new_quant_version:
            if layer.scale_bias.shape[1] == 1:
                layer.scale_bias.data = layer.scale_bias.data.flatten()
            layer.weight.data = weight.view(torch.int32)
            return
        k, n = weight.shape
        per_input = (weight.to(torch.float32).reshape(second.shape[0], -1, n) * second.reshape(-1, 1, n)).reshape(k, n)
        bias = 8 * (per_input * scale).sum(0)
        layer.register_parameter("weight_scale_bias", torch.nn.Parameter(bias, requires_grad=False))
        layer.weight.data = _keep_format(weight, emulate_int4pack(weight))


class UpstreamMoEMethod:
    """vllm-ascend 0.23's AscendW4A8DynamicFusedMoEMethod, re-told, with the endings of later releases
    where this process's flags ask for them (MegaMoE, 0.25.1rc1 on). ``Config.mutation`` changes one
    step, as a new engine release might."""

    per_channel_only = False

    def __init__(self):
        description = get_current_vllm_config().quant_config.quant_description
        self.group_size = description.get("group_size", 256)
        if self.per_channel_only and self.group_size > 0:
            raise ValueError(
                "The current weights use Per-Group quantization, which is no longer supported. Please "
                "switch to Per-Channel quantized weights."
            )
        self.is_per_channel_weight = self.group_size == 0
        self.new_quant_version = description.get("version", "0") == "1.0.0"
        self.compressed_tensors = description.get("ascend_quant_method") == "compressed-tensors"
        self.tp_size = 1 if Config.expert_parallel else Config.tp_size
        self.dynamic_eplb = Config.dynamic_eplb

    def get_weight(self, num_experts, intermediate, hidden, params_dtype):
        e, i, h = num_experts, intermediate, hidden
        if self.new_quant_version:
            return {
                "w13_weight": torch.empty(e, i, h, dtype=torch.int8),
                "w2_weight": torch.empty(e, h // 2, i, dtype=torch.int8),
            }
        return {
            "w13_weight": torch.empty(e, 2 * i, h, dtype=torch.int8),
            "w2_weight": torch.empty(e, h, i, dtype=torch.int8),
        }

    def get_dynamic_quant_param(self, num_experts, intermediate, hidden, params_dtype):
        e, i, h = num_experts, intermediate, hidden
        if self.compressed_tensors:
            return {
                "w13_weight_scale": torch.empty(e, 2 * i, 1, dtype=torch.bfloat16),
                "w2_weight_scale": torch.empty(e, h, 1, dtype=torch.bfloat16),
            }
        params = {
            "w13_weight_scale": torch.empty(e, 2 * i, 1),
            "w13_weight_offset": torch.empty(e, 2 * i, 1),
            "w2_weight_scale": torch.empty(e, h, 1),
            "w2_weight_offset": torch.empty(e, h, 1),
        }
        if not self.is_per_channel_weight:
            g = self.group_size
            params["w13_weight_scale_second"] = torch.empty(e, 2 * i, h // g)
            params["w13_weight_offset_second"] = torch.empty(e, 2 * i, h // g)
            params["w2_weight_scale_second"] = torch.empty(e, h, i // g)
            params["w2_weight_offset_second"] = torch.empty(e, h, i // g)
        if self.new_quant_version:
            params["w13_scale_bias"] = torch.empty(e, 2 * i, 1)
            params["w2_scale_bias"] = torch.empty(e, h, 16 // self.tp_size)
        return params

    def _scale(self, weight, scale, second):
        """[E, out, 1] scales (and [E, out, groups] second scales) -> int64 [E, groups, out], and the
        bias a mindie source needs."""
        scale = scale.transpose(1, 2).contiguous()  # [E, 1, out]
        if self.is_per_channel_weight:
            return _fp32_bits_as_int64(scale.to(torch.float16) if _mutated("scale dtype") else scale), None
        second = second.transpose(1, 2).contiguous()  # [E, groups, out]
        e, k, n = weight.shape
        n = n * 2 if self.new_quant_version else n
        bias = None
        if not self.new_quant_version:
            grouped = weight.to(torch.float32).reshape(e, second.shape[1], -1, n) * second.reshape(e, -1, 1, n)
            bias = 8 * (grouped.reshape(e, k, n) * scale).sum(1)
        return _fp32_bits_as_int64((scale * second).to(torch.float16).to(torch.float32)), bias

    def process_weights_after_loading(self, layer):
        layer.w13_weight.data = layer.w13_weight.data.transpose(1, 2).contiguous()
        if not _mutated("transpose"):
            layer.w2_weight.data = layer.w2_weight.data.transpose(1, 2).contiguous()
        if self.compressed_tensors:
            self._compressed_tensors(layer)
        else:
            self._modelslim(layer)
        if not _mutated("no NZ"):  # the 0.26 branch keeps MegaMoE weights ND
            layer.w13_weight.data = maybe_trans_nz(layer.w13_weight.data)
            layer.w2_weight.data = maybe_trans_nz(layer.w2_weight.data)
        self._ending(layer)

    def _compressed_tensors(self, layer):
        biases = []
        for name in ("w13", "w2"):
            weight, scale = getattr(layer, f"{name}_weight").data, getattr(layer, f"{name}_weight_scale").data
            biases.append(8 * (weight.to(torch.float32) * scale.transpose(1, 2)).sum(1))
            encoded = _fp32_bits_as_int64(scale.transpose(1, 2).to(torch.float32))
            getattr(layer, f"{name}_weight_scale").data = encoded.squeeze(1) if name == "w13" else encoded
            w = weight.to(torch.int16)
            getattr(layer, f"{name}_weight").data = ((w[..., 1::2] << 4) | (w[..., 0::2] & 0xF)).to(torch.int8)
        layer.register_parameter("w13_scale_bias", torch.nn.Parameter(biases[0], requires_grad=False))
        layer.register_parameter("w2_scale_bias", torch.nn.Parameter(biases[1], requires_grad=False))

    def _modelslim(self, layer):
        biases = {}
        for name in ("w13", "w2"):
            second = getattr(layer, f"{name}_weight_scale_second", None)
            encoded, biases[name] = self._scale(
                getattr(layer, f"{name}_weight").data,
                getattr(layer, f"{name}_weight_scale").data,
                None if second is None else second.data,
            )
            getattr(layer, f"{name}_weight_scale").data = encoded
        for name in (
            "w13_weight_scale_second",
            "w2_weight_scale_second",
            "w13_weight_offset_second",
            "w2_weight_offset_second",
        ):
            if hasattr(layer, name):
                delattr(layer, name)
        if self.new_quant_version:
            for name in ("w13_scale_bias", "w2_scale_bias"):
                chunks = getattr(layer, name).data
                if _mutated("scale_bias summation order"):
                    summed = chunks.flip(-1).sum(-1)
                else:
                    summed = chunks.transpose(1, 2).contiguous().sum(axis=1)
                getattr(layer, name).data = summed
        else:
            for name, bias in biases.items():
                layer.register_parameter(f"{name}_scale_bias", torch.nn.Parameter(bias, requires_grad=False))
        if self.is_per_channel_weight:
            layer.w13_weight_scale.data = layer.w13_weight_scale.data.squeeze(1)

    def _ending(self, layer):
        stacked = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias")
        if self.dynamic_eplb or getattr(self, "use_expert_weight_list", False):
            for name in stacked:
                source = "w2_weight_scale" if _mutated("list") and name == "w13_weight_scale" else name
                setattr(layer, f"{name}_list", [t.clone() for t in getattr(layer, source).data.unbind(0)])
            for name in stacked:
                delattr(layer, name)
            return
        if Config.mega_moe_supported and Config.enable_fused_mc2 == 1:
            for name in ("w13", "w2"):
                weights = getattr(layer, f"{name}_weight").data.unbind(0)
                setattr(layer, f"cann_mega_moe_{name}_weight_list", [w.clone() for w in weights])
                scales = getattr(layer, f"{name}_weight_scale").data.unbind(0)
                setattr(layer, f"cann_mega_moe_{name}_weight_scale_list", [t.reshape(-1) for t in scales])
                biases = getattr(layer, f"{name}_scale_bias").data.unbind(0)
                setattr(layer, f"cann_mega_moe_{name}_scale_bias_list", [t.reshape(-1).float() for t in biases])
            for name in stacked:
                delattr(layer, name)
            return
        for name in ("w13_weight", "w2_weight"):
            weight = getattr(layer, name).data
            packed = weight.view(torch.int32) if self.new_quant_version or self.compressed_tensors else None
            getattr(layer, name).data = packed if packed is not None else _keep_format(weight, emulate_int4pack(weight))
        if Config.release == "quantizer":  # the mid-2025 release kept the MoE scales under *_second names
            for name in ("w13_weight_scale", "w2_weight_scale"):
                layer.register_parameter(f"{name}_second", getattr(layer, name))
                delattr(layer, name)


class UpstreamMainMoEMethod(UpstreamMoEMethod):
    """main's method: per-channel only (per-group refused in ``__init__``), no ``group_size`` kept."""

    per_channel_only = True

    def __init__(self):
        super().__init__()
        del self.group_size
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
        weights = self.quant_method.get_weight(input_size_per_partition, out, params_dtype)
        packed = {k.lstrip("_"): weights.pop(k) for k in ("_packed_dim", "_packed_factor") if k in weights}
        for name, value in weights.items():
            _register(layer, name, value, {"input_dim": 1, "output_dim": 0}, packed, extra)
        layer_type = {"layer_type": "row" if layer.row_parallel else "others"} if self.passes_layer_type else {}
        for name, value in self.quant_method.get_pergroup_param(
            input_size_per_partition, out, params_dtype, **layer_type
        ).items():
            param = _register(layer, name, value, {"output_dim": 0}, extra)
            if "weight_scale_second" in name or "weight_offset_second" in name:
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
        per_channel = getattr(param, "quant_method", None) == CHANNEL
        if any(word in weight_name for word in ("scale", "zero", "offset")) and per_channel and shard_id == "w2":
            expert.copy_(loaded.reshape(expert.shape))
            return
        # vLLM 0.23 slices the loaded tensor by its own size // tp and narrows the parameter to what came:
        # a [H, 1] scale marked "group" gives each rank 0 columns, and the parameter keeps what it had.
        per_rank = loaded.shape[shard_dim] // self.tp_size
        start = per_rank * self.tp_rank
        if loaded.shape[shard_dim] - start <= 0:
            return
        loaded = loaded.narrow(shard_dim, start, min(per_rank, loaded.shape[shard_dim] - start))
        if shard_id != "w2":
            size = expert.shape[shard_dim] // 2
            expert = expert.narrow(shard_dim, 0 if shard_id == "w1" else size, size)
        expert.narrow(shard_dim, 0, loaded.shape[shard_dim]).copy_(loaded)

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """vLLM's expert params mapping after the model's own renaming: experts.E.gate_proj.X (or w1) ->
        w13_X (w1), up (w3) -> w13_X (w3), down (w2) -> w2_X."""
        shards = {"gate": ("w13", "w1"), "up": ("w13", "w3"), "down": ("w2", "w2")}
        for name, tensor in tensors.items():
            if not name.startswith(prefix + "."):
                continue
            expert, proj, suffix = name[len(prefix) + 1 :].split(".", 2)
            param_name, shard_id = shards[ROLE_OF[proj]]
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
        self.row_parallel, self.tp_rank, self.tp_size = row_parallel, tp_rank, tp_size
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


_formats: dict[int, int] = {}  # storage -> device format, as torch_npu keeps it with the storage
_cast: list[torch.Tensor] = []  # held, so that no later tensor gets a cast one's address


def npu_format_cast(tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
    _formats[tensor.untyped_storage().data_ptr()] = acl_format
    _cast.append(tensor)
    return tensor


def get_npu_format(tensor: torch.Tensor) -> int:
    """2 (ND) unless cast; views share their storage's format, copies (clone) do not. A packing operator
    is taken to keep its input's format: only a device can tell (the canary asks it there)."""
    return _formats.get(tensor.untyped_storage().data_ptr(), 2)


def _keep_format(source: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    if source.untyped_storage().data_ptr() in _formats:
        npu_format_cast(result, get_npu_format(source))
    return result


def maybe_trans_nz(tensor: torch.Tensor) -> torch.Tensor:
    """vllm-ascend's: a FRACTAL_NZ cast through torch_npu, here a stand-in that keeps the values."""
    nz_casts.append((str(tensor.dtype), tuple(tensor.shape)))
    return sys.modules["torch_npu"].npu_format_cast(tensor, 29)


def install(release: str) -> None:
    """Put stand-in ``vllm_ascend`` modules of ``release`` ("registry", "main" or "quantizer") in sys.modules."""
    nz_casts.clear()
    _formats.clear()
    _cast.clear()
    canary.forget()
    Config.release = release
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
    module("torch_npu", npu_format_cast=npu_format_cast, get_npu_format=get_npu_format)
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
    canary.forget()
    for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "vllm_ascend", "torch_npu")]:
        del sys.modules[name]
    for adapter in (LinearAdapter, MoEAdapter):  # undo the plugin's create_weights wrapper
        if getattr(adapter.create_weights, "_w4a8conv", False):
            adapter.create_weights = adapter.create_weights.__wrapped__
