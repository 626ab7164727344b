"""Serving W4A8 MoE layers with the real vLLM and vllm-ascend code (0.23.0 in ``make test-engine``, a source
tree in ``make test-engine-src``), without a model or a device: what those and ``make bench-canary`` share.

vLLM's own MoE weight loader (``FusedMoE``'s, ``RoutedExperts``' from 0.24 on) and vllm-ascend's own method
adapter and W4A8 methods run unchanged; only what they ask of a running server is answered, by w4a8conv's
own sandbox (the one ``check-engine`` drives the engine with): :data:`Serving` says what, :func:`serving`
answers it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import vllm
from packaging.version import Version
from safetensors import safe_open

from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.serving.vllm_plugin import detect_api, sandbox

# What a server would answer the engine: one state, changed by the tests, answered while sandbox.serving runs.
Serving = sandbox.Serving()

ENGINE = detect_api()
# What the installed release does differently, which the tests expect of it:
# vllm-ascend main serves per-channel MoE only (its W4A8 method refuses per-group weights) and has no W4A8 Linear.
PER_CHANNEL_ONLY = ENGINE.release == "registry-moe-only"
# vLLM 0.27 on: RoutedExperts' loader takes every tensor named *bias for an expert bias and copies a w2 one whole,
# so at MoE tensor parallelism above 1 stock fails to load msModelSlim's w2 scale_bias [H, 16] (and the canary,
# which runs stock on the source, refuses); the plugin hands the loader each rank's chunks, so outputs of sources
# without one (compressed-tensors) serve.
BIASES_COPIED_WHOLE = Version(vllm.__version__).release >= (0, 27)
STOCK_FAILS = r"cannot load or process the canary MoE expert .* itself at this parallel layout \(RuntimeError: "
PER_GROUP_REFUSAL = "Per.Group quantization, which is no longer supported"


def refused_at(moe_tp: int, layout: str = "v1.0.0-per-channel") -> bool:
    """Whether outputs of ``layout`` sources are refused at this MoE tensor-parallel size on the installed vLLM
    because stock cannot load their source there."""
    return BIASES_COPIED_WHOLE and moe_tp > 1 and layout != "compressed-tensors"


def serving():
    """The engine's server-wide getters answered from :data:`Serving` (a context manager)."""
    return sandbox.serving(Serving)


def load(layer: torch.nn.Module, path: Path, prefix: str) -> None:
    """Every tensor of the MoE layer under ``prefix`` in checkpoint order, through the layer's own loader."""
    ckpt = open_checkpoint(path)
    for name in sorted(n for n in ckpt.tensors if n.startswith(prefix + ".")):
        expert, proj, role = name[len(prefix) + 1 :].split(".", 2)
        group, shard = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}[proj]
        param = getattr(layer, f"{group}_{role}", None)
        if param is None:
            continue
        with safe_open(str(ckpt.tensors[name].path), "pt") as f:
            tensor = f.get_tensor(name)
        param.weight_loader(param, tensor, f"{prefix}.{group}_{role}", shard_id=shard, expert_id=int(expert))


def bare_moe_layer() -> torch.nn.Module:
    """An uninitialised layer of the class vLLM keeps MoE weights on: what the engine's quant config checks
    a layer's class against when it picks a method."""
    cls = sandbox.moe_layer_class()
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    return layer


def load_as_model(
    layer: torch.nn.Module, path: Path, prefix: str, rename: Callable[[str], str], names: tuple[str, str, str]
) -> None:
    """Feed ``layer`` the experts under ``prefix`` as a model's ``load_weights`` does: its own renaming of the
    checkpoint's names (``rename``), then vLLM's own expert params mapping for the checkpoint's gate, down and
    up projection names (``names``), which gives each tensor its parameter, shard id and expert."""
    gate, down, up = names
    experts = int(layer._expert_map.shape[0])
    mapping = type(layer).make_expert_params_mapping(layer, gate, down, up, num_experts=experts)
    ckpt = open_checkpoint(path)
    for name in sorted(n for n in ckpt.tensors if n.startswith(prefix + ".")):
        mapped = rename(name)
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name not in mapped:
                continue
            own = param_name.removeprefix("experts.").removeprefix("routed_experts.")  # the layer's own name
            attr = own + mapped.split(weight_name, 1)[1]
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


def build(path: Path, description: dict, method_class, sizes, local_experts, tp_size, tp_rank) -> torch.nn.Module:
    """A layer created by ``method_class`` as the server in :class:`Serving`'s mode would create it."""
    Serving.description, Serving.model, Serving.tp_size = description, str(path), tp_size
    moe_tp = 1 if Serving.expert_parallel else tp_size
    rank = 0 if Serving.expert_parallel else tp_rank
    return sandbox.loader_only_fused_moe(method_class(), sizes, local_experts, moe_tp, rank)
