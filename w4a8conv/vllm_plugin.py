"""vLLM plugin: serve a w4a8conv output on vllm-ascend with no repacking at load.

Installed with ``pip install w4a8conv[vllm-ascend]``; vLLM runs :func:`register` in every process
through the ``vllm.general_plugins`` entry point. It registers, for the ``W4A8_DYNAMIC_PREPACKED``
quant type our descriptions use, a Linear and a FusedMoE method with vllm-ascend. Both derive from
vllm-ascend's own W4A8_DYNAMIC methods, so the forward pass is upstream's, unchanged; they replace
only what happens before it:

* parameters are created in the processed shapes and dtypes (int32 words ``[in, out/8]``, int64 or
  float32 scales ``[in/g, out]``, float32 scale_bias with its input chunks);
* the weight loaders are told those tensors are stored transposed, so vLLM's own loaders place each
  expert's and each tensor-parallel rank's slice;
* ``process_weights_after_loading`` does what must happen on the device: sum this rank's scale_bias
  chunks, cast the weights to the NZ format, and give the tensors the names this vllm-ascend release
  reads. No packing, scale encoding or bias computation is left.

Everything that differs between vllm-ascend releases sits in :class:`VllmAscendApi`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .names import DESCRIPTION_FILE, PREPACKED_TYPE, SCALE_BIAS_CHUNKS, TOOL_SECTION, format_problem
from .scales import sum_scale_bias_chunks


def _logger() -> logging.Logger:
    """vLLM's logger when vLLM is there, so the lines show in its output; the standard one otherwise."""
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger(__name__)
    return init_logger(__name__)


log = _logger()
_VLLM_GROUP_SCALES = "group"  # vLLM's FusedMoeWeightScaleSupported.GROUP.value


@dataclass(frozen=True)
class VllmAscendApi:
    """The vllm-ascend entry points the plugin touches, for the installed release.

    Attributes:
        release: ``"registry"`` (scheme registry, vllm-ascend 0.11 to the 0.26 branch),
            ``"registry-moe-only"`` (main, where the W4A8_DYNAMIC Linear scheme is removed) or
            ``"quantizer"`` (``SUPPORT_ASCEND_QUANTIZER_TYPE``, the mid-2025 releases w4a8conv was
            seeded from).
        linear_method, moe_method: upstream's W4A8_DYNAMIC methods, the plugin's base classes (no
            Linear on main).
        adapters: the wrappers whose ``create_weights`` registers a method's parameters.
        moe_scale_names: the names upstream's MoE ``apply`` reads the int64 scales from.
        register: registers the plugin's Linear and MoE methods for ``W4A8_DYNAMIC_PREPACKED``.
        registered: whether that has been done in this process.
        version: the installed vllm-ascend's version, None where it says none.
        mega_moe: whether MegaMoE is on (``enable_fused_mc2 == 1`` where ``cann_ops_transformer`` is
            installed, 0.25.1rc1 and later), whose kernels read per-expert ``cann_mega_moe_*`` lists.
        nz_cast: casts an int8 weight to the NPU's FRACTAL_NZ storage where the release does.
    """

    release: str
    linear_method: type | None
    moe_method: type
    adapters: tuple[type, ...]
    moe_scale_names: tuple[str, str]
    register: Callable[[type | None, type], None]
    registered: Callable[[], bool]
    nz_cast: Callable[[torch.Tensor], torch.Tensor]
    mega_moe: Callable[[], bool] = lambda: False
    version: str | None = None


def detect_api() -> VllmAscendApi:
    """Find the installed vllm-ascend's entry points (raises ImportError without vllm-ascend)."""
    try:
        from vllm_ascend.quantization.method_adapters import AscendFusedMoEMethod, AscendLinearMethod
        from vllm_ascend.quantization.methods import registry, w4a8
        from vllm_ascend.utils import maybe_trans_nz

        moe_method = w4a8.AscendW4A8DynamicFusedMoEMethod
    except (ImportError, AttributeError):
        return _detect_quantizer_release()
    linear_method = getattr(w4a8, "AscendW4A8DynamicLinearMethod", None)  # removed on main

    def register(linear: type | None, moe: type) -> None:
        if linear is not None:
            registry.register_scheme(PREPACKED_TYPE, "linear")(linear)
        registry.register_scheme(PREPACKED_TYPE, "moe")(moe)

    return VllmAscendApi(
        release="registry" if linear_method is not None else "registry-moe-only",
        linear_method=linear_method,
        moe_method=moe_method,
        adapters=(AscendLinearMethod, AscendFusedMoEMethod) if linear_method is not None else (AscendFusedMoEMethod,),
        moe_scale_names=("w13_weight_scale", "w2_weight_scale"),
        register=register,
        registered=lambda: registry.get_scheme_class(PREPACKED_TYPE, "moe") is not None,
        nz_cast=maybe_trans_nz,
        mega_moe=_mega_moe_on,
        version=_installed_version(),
    )


def _installed_version() -> str | None:
    """vllm-ascend's version: its setuptools_scm ``_version`` module, else the installed distribution's."""
    import importlib
    import importlib.metadata

    try:
        return str(importlib.import_module("vllm_ascend._version").version)
    except (ImportError, AttributeError):
        pass
    try:
        return importlib.metadata.version("vllm-ascend")
    except importlib.metadata.PackageNotFoundError:
        return None


def _mega_moe_on() -> bool:
    """MegaMoE as vllm-ascend decides it: ``_MEGA_MOE_SUPPORTED`` (in ``ascend_forward_context`` on
    0.25.1rc1 and the 0.26 branch, in ``ascend_config`` on main; absent before) and ``enable_fused_mc2 == 1``."""
    import importlib

    supported = False
    for name in ("vllm_ascend.ascend_config", "vllm_ascend.ascend_forward_context"):
        try:
            supported = supported or bool(getattr(importlib.import_module(name), "_MEGA_MOE_SUPPORTED", False))
        except ImportError:
            continue
    if not supported:
        return False
    from vllm_ascend.ascend_config import get_ascend_config

    return getattr(get_ascend_config(), "enable_fused_mc2", 0) == 1


def _detect_quantizer_release() -> VllmAscendApi:
    from vllm_ascend.quantization import quantizer
    from vllm_ascend.quantization.quant_config import AscendFusedMoEMethod, AscendLinearMethod
    from vllm_ascend.quantization.w4a8_dynamic import AscendW4A8DynamicFusedMoEMethod, AscendW4A8DynamicLinearMethod

    def register(linear: type, moe: type) -> None:
        prepacked_quantizer = type(
            "W4A8PrepackedQuantizer",
            (quantizer.VLLMAscendQuantizer,),
            {"build_linear_method": staticmethod(linear), "build_moe_method": staticmethod(moe)},
        )
        quantizer.SUPPORT_ASCEND_QUANTIZER_TYPE[PREPACKED_TYPE] = prepacked_quantizer

    return VllmAscendApi(
        release="quantizer",
        linear_method=AscendW4A8DynamicLinearMethod,
        moe_method=AscendW4A8DynamicFusedMoEMethod,
        adapters=(AscendLinearMethod, AscendFusedMoEMethod),
        moe_scale_names=("w13_weight_scale_second", "w2_weight_scale_second"),
        register=register,
        registered=lambda: PREPACKED_TYPE in quantizer.SUPPORT_ASCEND_QUANTIZER_TYPE,
        nz_cast=lambda tensor: tensor,  # that release kept W4A8 weights in ND
        version=_installed_version(),
    )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the prepacked methods with vllm-ascend.

    Idempotent: vllm-ascend's scheme registry refuses a second registration of a quant type, so a
    second call (a process that loads plugins twice) does nothing.
    """
    try:
        api = detect_api()
    except ImportError:
        log.debug("w4a8conv: vllm-ascend is not installed; nothing to register")
        return
    if api.registered():
        return
    linear, moe = build_methods(api)
    for adapter in api.adapters:
        _follow_create_weights(adapter)
    api.register(linear, moe)
    log.info("w4a8conv: %s checkpoints load without process_weights_after_loading's repacking", PREPACKED_TYPE)


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


@functools.cache
def _announce_once() -> None:
    log.info("w4a8conv: W4A8 MoE weights arrived prepacked; skipping repacking, scale encoding and bias sums")


def _section() -> dict[str, Any]:
    """The ``w4a8conv`` section of the checkpoint vLLM is loading (read as upstream reads the description)."""
    from vllm.config import get_current_vllm_config

    description = get_current_vllm_config().quant_config.quant_description
    section = description.get(TOOL_SECTION) if isinstance(description, dict) else None
    if not isinstance(section, dict):
        raise ValueError(
            f"w4a8conv: tensors are typed {PREPACKED_TYPE} but {DESCRIPTION_FILE} has no '{TOOL_SECTION}' section; "
            "convert the checkpoint again"
        )
    problem = format_problem(section)
    if problem is not None:
        raise ValueError(f"w4a8conv: {DESCRIPTION_FILE}: {problem}")
    return section


def check_engine_release(version: str | None) -> None:
    """Refuse a vllm-ascend release outside the range the checkpoint's processing mirrors.

    A development build (a git checkout of main or of a release branch) reports a version counted
    from the last tag on its history (0.19.1rc2.devN for main late in 2026), which says nothing about
    the code: it is let through with a warning, and what the code exposes decides.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    section = _section()
    releases = section.get("engine_releases")
    if releases is None:  # format 1 recorded none
        return
    try:
        installed = Version(version) if version else None
    except InvalidVersion:
        installed = None
    if installed is None or installed.is_devrelease or installed.local:
        _warn_unchecked_release(version, releases)
        return
    if installed not in SpecifierSet(releases, prereleases=True):
        raise ValueError(
            f"w4a8conv: this checkpoint was converted for {section.get('target')} (vllm-ascend {releases}), "
            f"found vllm-ascend {version}; convert it again with a --target for this release"
        )


@functools.cache
def _warn_unchecked_release(version: str | None, releases: str) -> None:
    log.warning(
        "w4a8conv: vllm-ascend %s is a development build or unversioned; the checkpoint's releases %s not checked",
        version,
        releases,
    )


def check_serving_dtype(params_dtype: torch.dtype) -> None:
    """Refuse to serve in another dtype than the one the checkpoint's scales were rounded to."""
    recorded = _section().get("params_dtype")
    found = str(params_dtype).removeprefix("torch.")
    if found != recorded:
        raise ValueError(
            f"w4a8conv: this checkpoint was converted for dtype {recorded} (its W4A8 scales are rounded to it), "
            f"but the server runs {found}; serve it with --dtype {recorded}, or convert it again"
        )


def check_moe_tensor_parallel(tp_size: int) -> None:
    """Refuse a MoE tensor-parallel size that does not split the stored scale_bias chunks evenly."""
    if tp_size < 1 or SCALE_BIAS_CHUNKS % tp_size:
        sizes = ", ".join(str(n) for n in range(1, SCALE_BIAS_CHUNKS + 1) if SCALE_BIAS_CHUNKS % n == 0)
        raise ValueError(
            f"w4a8conv: MoE tensor-parallel size must divide the checkpoint's {SCALE_BIAS_CHUNKS} scale_bias chunks "
            f"({sizes}), found {tp_size}; use one of those or --enable-expert-parallel"
        )


def build_methods(api: VllmAscendApi) -> tuple[type | None, type]:
    """The plugin's Linear and MoE methods, derived from this release's W4A8_DYNAMIC methods (no Linear on main)."""
    linear = _linear_method(api) if api.linear_method is not None else None
    return linear, _moe_method(api)


def _linear_method(api: VllmAscendApi) -> type:

    class PrepackedW4A8LinearMethod(api.linear_method):
        """A W4A8_DYNAMIC Linear whose tensors w4a8conv already processed."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            check_engine_release(api.version)

        def get_weight(self, input_size: int, output_size: int, params_dtype: torch.dtype) -> dict[str, Any]:
            check_serving_dtype(params_dtype)
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
            layer.weight.data = _nz(api, layer.weight.data)
            bias = layer.scale_bias.data
            if getattr(self, "new_quant_version", False):  # 1.0.0 source: upstream keeps scale_bias
                layer.scale_bias.data = bias.flatten() if bias.shape[1] == 1 else bias.contiguous()
            else:  # mindie source: upstream computes weight_scale_bias [out]
                del layer.scale_bias
                layer.register_parameter("weight_scale_bias", torch.nn.Parameter(bias.sum(-1), requires_grad=False))

    return PrepackedW4A8LinearMethod


def _moe_method(api: VllmAscendApi) -> type:
    class PrepackedW4A8FusedMoEMethod(api.moe_method):
        """A W4A8_DYNAMIC FusedMoE layer whose expert tensors w4a8conv already processed."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            check_engine_release(api.version)
            if not hasattr(self, "group_size"):  # main keeps none: it serves per-channel weights only
                self.group_size = _section().get("group_size", 0)
            check_moe_tensor_parallel(self.tp_size)

        def get_weight(self, num_experts, intermediate_size_per_partition, hidden_sizes, params_dtype):
            check_serving_dtype(params_dtype)
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

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
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
