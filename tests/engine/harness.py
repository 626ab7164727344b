"""Serving W4A8 MoE layers with the real vLLM 0.23.0 and vllm-ascend 0.23.0 code, without a model or a
device: what ``make test-engine`` and ``make bench-canary`` share.

vLLM's own FusedMoE weight loader and vllm-ascend's own method adapter and W4A8 methods run unchanged;
only what they ask of a running server is answered here (:class:`Serving`, :func:`patch_engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm_ascend.quantization import method_adapters
from vllm_ascend.quantization.methods import w4a8

from w4a8conv.reading.checkpoint import open_checkpoint


class Serving:
    """What vllm-ascend's W4A8 code asks of the server: the vLLM config, parallel sizes, ascend config."""

    description: ClassVar[dict] = {}
    model: str = ""
    tp_size = 1
    expert_parallel = False
    dynamic_eplb = False
    mix_placement = False  # DeepSeek-V4's shared experts loaded among the routed ones


class _QuantConfig:
    @property
    def quant_description(self) -> dict:
        return Serving.description

    @quant_description.setter
    def quant_description(self, value: dict) -> None:
        Serving.description = value


VLLM_CONFIG = SimpleNamespace(
    quant_config=_QuantConfig(),
    model_config=SimpleNamespace(model=None, revision=None),
    parallel_config=SimpleNamespace(),
)


def patch_engine(setattr_: Callable[..., Any]) -> None:
    """Answer the server-wide getters vllm-ascend's W4A8 module calls (``setattr_``: monkeypatch's or
    the builtin): the config, the tensor-parallel size, no MC2 group, EPLB from :class:`Serving`, NZ casts
    of everything but fp32, as on an A2/A3 device."""

    def vllm_config() -> SimpleNamespace:
        VLLM_CONFIG.model_config.model = Serving.model
        VLLM_CONFIG.parallel_config.enable_expert_parallel = Serving.expert_parallel
        return VLLM_CONFIG

    def no_mc2_group() -> None:
        raise AttributeError("no MC2 group on this machine")

    import vllm.config
    import vllm_ascend.utils

    setattr_(w4a8, "get_current_vllm_config", vllm_config)
    setattr_(vllm.config, "get_current_vllm_config", vllm_config)
    setattr_(w4a8, "get_tensor_model_parallel_world_size", lambda: Serving.tp_size)
    setattr_(w4a8, "get_mc2_group", no_mc2_group)

    def ascend_config() -> SimpleNamespace:
        eplb = SimpleNamespace(dynamic_eplb=Serving.dynamic_eplb)
        return SimpleNamespace(eplb_config=eplb, enable_fused_mc2=0, mix_placement=Serving.mix_placement)

    import vllm_ascend.ascend_config

    setattr_(w4a8, "get_ascend_config", ascend_config)
    setattr_(vllm_ascend.ascend_config, "get_ascend_config", ascend_config)
    setattr_(vllm_ascend.utils, "_should_trans_nz", lambda weight: weight.dtype != torch.float32)


class LoaderOnlyFusedMoE(FusedMoE):
    """vLLM's FusedMoE with its own weight_loader and expert map, without the model around it."""

    def __init__(self, quant_method, sizes: tuple[int, int, int], local_experts: list[int], tp_size: int, tp_rank: int):
        experts, hidden, intermediate = sizes
        torch.nn.Module.__init__(self)
        self.quant_config = None
        self.rocm_aiter_fmoe_enabled = False
        self.moe_parallel_config = SimpleNamespace(tp_size=tp_size, tp_rank=tp_rank, ep_size=1, ep_rank=0)
        self.moe_config = SimpleNamespace(is_act_and_mul=True, moe_parallel_config=self.moe_parallel_config)
        expert_map = torch.full((experts,), -1, dtype=torch.int32)
        expert_map[local_experts] = torch.arange(len(local_experts), dtype=torch.int32)
        self._expert_map = expert_map
        self.expert_map_manager = SimpleNamespace(map_global_to_local=lambda g: int(expert_map[g]))
        adapter = method_adapters.AscendFusedMoEMethod.__new__(method_adapters.AscendFusedMoEMethod)
        adapter.quant_method = quant_method
        self.quant_method = adapter
        adapter.create_weights(
            self, len(local_experts), hidden, intermediate // tp_size, torch.bfloat16, weight_loader=self.weight_loader
        )

    def load(self, path: Path, prefix: str) -> None:
        """vLLM's expert params mapping, every tensor of the layer in checkpoint order."""
        ckpt = open_checkpoint(path)
        for name in sorted(n for n in ckpt.tensors if n.startswith(prefix + ".")):
            expert, proj, role = name[len(prefix) + 1 :].split(".", 2)
            group, shard = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}[proj]
            param = getattr(self, f"{group}_{role}", None)
            if param is None:
                continue
            with safe_open(str(ckpt.tensors[name].path), "pt") as f:
                tensor = f.get_tensor(name)
            param.weight_loader(param, tensor, f"{prefix}.{group}_{role}", shard_id=shard, expert_id=int(expert))


def load_as_model(
    layer: FusedMoE, path: Path, prefix: str, rename: Callable[[str], str], names: tuple[str, str, str]
) -> None:
    """Feed ``layer`` the experts under ``prefix`` as a model's ``load_weights`` does: its own renaming of the
    checkpoint's names (``rename``), then vLLM's own expert params mapping for the checkpoint's gate, down and
    up projection names (``names``), which gives each tensor its parameter, shard id and expert."""
    gate, down, up = names
    experts = int(layer._expert_map.shape[0])
    mapping = FusedMoE.make_expert_params_mapping(layer, gate, down, up, num_experts=experts)
    ckpt = open_checkpoint(path)
    for name in sorted(n for n in ckpt.tensors if n.startswith(prefix + ".")):
        mapped = rename(name)
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name not in mapped:
                continue
            attr = param_name.removeprefix("experts.") + mapped.split(weight_name, 1)[1]
            param = getattr(layer, attr, None)
            if param is not None:
                with safe_open(str(ckpt.tensors[name].path), "pt") as f:
                    tensor = f.get_tensor(name)
                param.weight_loader(param, tensor, attr, shard_id=shard_id, expert_id=expert_id)
            break
        else:
            raise AssertionError(f"{name} (renamed {mapped}) matches no expert parameter")


def stock_description(src: Path, group_size: int) -> dict:
    """What vllm-ascend's configs give its W4A8 method for the unconverted checkpoint (mindie's group
    size added by hand, as its users do: without it vllm-ascend assumes 256)."""
    ckpt = open_checkpoint(src)
    if ckpt.served_config is not None:
        return {
            "ascend_quant_method": "compressed-tensors",
            "group_size": 0,
            "version": "0",
            "weight_strategy": "channel",
        }
    description = {k: v for k, v in ckpt.description.items() if "." not in k}
    description.setdefault("group_size", group_size)
    return description


def build(path: Path, description: dict, method_class, sizes, local_experts, tp_size, tp_rank) -> LoaderOnlyFusedMoE:
    """A layer created by ``method_class`` as the server in :class:`Serving`'s mode would create it."""
    Serving.description, Serving.model, Serving.tp_size = description, str(path), tp_size
    moe_tp = 1 if Serving.expert_parallel else tp_size
    return LoaderOnlyFusedMoE(method_class(), sizes, local_experts, moe_tp, 0 if Serving.expert_parallel else tp_rank)
