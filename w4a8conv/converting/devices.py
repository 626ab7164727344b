"""Choosing the torch device the processing runs on. ``torch_npu`` is imported only when asked for."""

from __future__ import annotations

import importlib

from ..errors import BadInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")


def _npu_available() -> bool:
    import torch

    try:
        importlib.import_module("torch_npu")  # registers the "npu" device with torch
    except Exception:  # torch_npu raises more than ImportError without Ascend's CANN
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available() and npu.device_count() > 0)


def resolve_device(name: str) -> str:
    """``auto`` picks npu when torch_npu imports and sees a device, then cuda, then cpu.

    ``cpu`` is answered without importing torch, so a CPU conversion can start before torch has loaded.
    """
    if name not in DEVICE_CHOICES:
        raise BadInputError(f"--device {name}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cpu":
        return "cpu"
    import torch

    if name in ("npu", "auto") and _npu_available():
        return "npu"
    if name == "npu":
        raise BadInputError("--device npu: torch_npu does not import or sees no NPU (install w4a8conv[npu] and CANN)")
    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise BadInputError("--device cuda: torch sees no CUDA device (is this a CPU build of torch?)")
    return "cpu"
