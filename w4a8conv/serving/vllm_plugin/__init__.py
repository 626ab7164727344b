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

from ...names import PREPACKED_TYPE
from .api import VllmAscendApi, detect_api
from .checks import check_engine_release, check_groups_per_rank, check_moe_tensor_parallel, check_serving_dtype
from .log import log
from .methods import _follow_create_weights, build_methods

__all__ = [
    "VllmAscendApi",
    "build_methods",
    "check_engine_release",
    "check_groups_per_rank",
    "check_moe_tensor_parallel",
    "check_serving_dtype",
    "detect_api",
    "register",
]


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
