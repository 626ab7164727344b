"""A stand-in for torch_npu (which needs Ascend's CANN): what vllm-ascend 0.23 imports, with the two int4
packing operators and the NZ cast emulated on the CPU and recorded in :data:`calls`.

Any other attribute or submodule is a do-nothing placeholder: vllm-ascend touches many at import time
that a W4A8 load never calls. A placeholder called during a W4A8 load raises, so it cannot pass silently.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch

calls: list[tuple[str, str, tuple[int, ...]]] = []
__version__ = "2.13.0.stand-in"


def _record(name: str, tensor: torch.Tensor) -> None:
    calls.append((name, str(tensor.dtype), tuple(tensor.shape)))


def npu_format_cast(tensor: torch.Tensor, acl_format: int, *args, **kwargs) -> torch.Tensor:
    """A storage format (29: FRACTAL_NZ) on the device; the values are unchanged."""
    _record(f"npu_format_cast({acl_format})", tensor)
    return tensor


def _pack_int4_last_dim(values: torch.Tensor) -> torch.Tensor:
    """int4 values (-8..7) along the last dim -> int32 words, element 8m+j in bits 4j..4j+3 of word m
    (two's-complement nibbles, low nibble first), built in place one nibble position at a time."""
    *lead, n = values.shape
    grouped = values.reshape(*lead, n // 8, 8)
    words = torch.zeros(*lead, n // 8, dtype=torch.int32)
    for j in range(8):
        words |= (grouped[..., j].to(torch.int32) & 0xF) << (4 * j)
    return words


def npu_convert_weight_to_int4pack(weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    _record("npu_convert_weight_to_int4pack", weight)
    return _pack_int4_last_dim(weight)


def npu_quantize(x, scales, zero_points, dtype, axis=-1, div_mode=True):
    """Only the use vllm-ascend's mindie MoE path makes: int4 values with scale 1 packed to quint4x2."""
    _record("npu_quantize", x)
    if dtype != torch.quint4x2 or axis != -1 or zero_points is not None:
        raise NotImplementedError("torch_npu stand-in: npu_quantize emulates the quint4x2 int4 packing only")
    if not bool((scales == 1).all()):
        x = torch.round(x / scales.to(x.dtype)).clamp(-8, 7)
    return _pack_int4_last_dim(x)


def _placeholder(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"torch_npu stand-in: {name} is not emulated")

    return call


def _placeholder_or_type(qualified: str, name: str):
    """A class for a capitalised name (used in annotations such as ``torch.npu.Stream | None``), else a
    function that raises when called."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name[:1].isupper():
        return type(name, (), {"__module__": qualified})
    return _placeholder(f"{qualified}.{name}")


def __getattr__(name: str):
    return _placeholder_or_type("torch_npu", name)


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any ``torch_npu.x.y`` imports as a module of placeholders."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torch_npu."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: (
            _placeholder(f"{spec.name}.{name}")
            if not name.startswith("__")
            else ((_ for _ in ()).throw(AttributeError(name)))
        )
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Placeholders())
if not hasattr(torch.Tensor, "npu"):
    torch.Tensor.npu = lambda self, *args, **kwargs: self  # the "device" is the CPU
if not hasattr(torch, "npu"):  # what torch_npu adds to torch
    torch.npu = types.ModuleType("torch.npu")
    torch.npu.__getattr__ = lambda name: _placeholder_or_type("torch.npu", name)
    torch.npu.is_available = lambda: False
    torch.npu.device_count = lambda: 0
