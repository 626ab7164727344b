"""The installed vllm-ascend's entry points: every difference between its release generations is here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...names import PREPACKED_TYPE


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
        mix_placement: whether ``mix_placement`` is on (0.23 on): the model then loads its shared experts
            into the routed experts' FusedMoE, as experts numbered after them.
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
    mix_placement: Callable[[], bool] = lambda: False
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
        mix_placement=_mix_placement_on,
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
    """MegaMoE as vllm-ascend decides it for this server: its own ``use_cann_megamoe(vllm_config)`` where it
    has one (the 0.26 branch on: A3 devices, expert parallelism, EP sizes 2 to 64...), else, as 0.25.1rc1 and
    main in 2026-12 decide it, ``_MEGA_MOE_SUPPORTED`` (in ``ascend_forward_context`` or ``ascend_config``)
    and ``enable_fused_mc2 == 1``."""
    import importlib

    try:
        from vllm_ascend.ascend_forward_context import use_cann_megamoe
    except ImportError:
        use_cann_megamoe = None
    if use_cann_megamoe is not None:
        from vllm.config import get_current_vllm_config

        return bool(use_cann_megamoe(get_current_vllm_config()))
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


def _mix_placement_on() -> bool:
    from vllm_ascend.ascend_config import get_ascend_config

    return bool(getattr(get_ascend_config(), "mix_placement", False))


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
