"""Device choice and the NPU path, with a stand-in torch_npu that emulates its two packing operators."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from w4a8conv.converting.devices import resolve_device
from w4a8conv.converting.npu import npu_pack_int4_to_int32
from w4a8conv.converting.processing import process_projection
from w4a8conv.errors import BadInputError
from w4a8conv.formats.packing import pack_int4_to_int32
from w4a8conv.planning.planner import build_plan
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.safetensors_io import read_tensor

from .upstream_reference import emulate_int4pack


def make_stand_in(calls: list[str], device_count: int = 1) -> types.ModuleType:
    """A torch_npu that packs on the CPU like the real operators and insists on their input dtypes."""
    module = types.ModuleType("torch_npu")

    def npu_convert_weight_to_int4pack(weight: torch.Tensor) -> torch.Tensor:
        assert weight.dtype == torch.int32, "npu_convert_weight_to_int4pack takes int32"
        calls.append("npu_convert_weight_to_int4pack")
        return emulate_int4pack(weight)

    def npu_quantize(x, scales, zero_points, dtype, axis, div_mode):
        assert x.dtype == torch.float32 and dtype == torch.quint4x2 and axis == -1 and div_mode is False
        assert zero_points is None and scales.tolist() == [1.0]
        calls.append("npu_quantize")
        return emulate_int4pack(torch.round(x / scales).clamp(-8, 7).to(torch.int8))

    module.npu_convert_weight_to_int4pack = npu_convert_weight_to_int4pack
    module.npu_quantize = npu_quantize
    module.npu = types.SimpleNamespace(is_available=lambda: device_count > 0, device_count=lambda: device_count)
    return module


@pytest.fixture
def stand_in(monkeypatch):
    calls: list[str] = []
    module = make_stand_in(calls)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)
    return calls


def test_cpu_is_the_default_and_auto_falls_back_to_it():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unavailable_devices_are_bad_input():
    with pytest.raises(BadInputError, match="--device npu: torch_npu does not import"):
        resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="--device cuda: torch sees no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(BadInputError, match="choose one of"):
        resolve_device("tpu")


def test_auto_prefers_an_npu_that_torch_npu_sees(stand_in, monkeypatch):
    assert resolve_device("auto") == "npu"
    assert resolve_device("npu") == "npu"
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0))
    assert resolve_device("auto") in ("cpu", "cuda")


def test_npu_packers_match_the_portable_packing(stand_in):
    values = torch.randint(-8, 8, (64, 40), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    expected = pack_int4_to_int32(values)
    assert torch.equal(npu_pack_int4_to_int32(values, for_moe=True), expected)
    assert torch.equal(npu_pack_int4_to_int32(values, for_moe=False), expected)
    assert stand_in == ["npu_quantize", "npu_convert_weight_to_int4pack"]


def test_npu_path_processes_every_projection_identically(stand_in, source_checkpoints):
    """The processing with torch_npu's operators gives the same tensors as the CPU reference, bit for bit."""
    plan = build_plan(open_checkpoint(source_checkpoints["mindie"]))
    assert any(not p.is_moe for p in plan.modules) and any(p.is_moe for p in plan.modules)
    for projection in plan.modules:
        tensors = {role: read_tensor(info) for role, info in projection.sources.items()}
        reference = process_projection(projection, tensors)
        packer = lambda v, p=projection: npu_pack_int4_to_int32(v, for_moe=p.is_moe)  # noqa: E731
        npu = process_projection(projection, tensors, pack_int4=packer)
        for name in reference:
            assert torch.equal(reference[name], npu[name]), name
    assert "npu_quantize" in stand_in and "npu_convert_weight_to_int4pack" in stand_in


def test_planning_does_not_import_torch():
    """inspect and the planning before a conversion run without torch (it loads in the background)."""
    code = (
        "import sys, w4a8conv.cli, w4a8conv.planning.inspect, w4a8conv.converting.convert, w4a8conv.planning.planner; "
        "from w4a8conv.converting.devices import resolve_device; resolve_device('cpu'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_is_first_imported_with_one_openblas_thread():
    """OpenBLAS's idle threads spin; the CLI limits them before anything it imports loads numpy."""
    code = (
        "import builtins, os\n"
        "seen, real = {}, builtins.__import__\n"
        "def hook(name, *args, **kwargs):\n"
        "    if name.split('.')[0] == 'numpy':\n"
        "        seen.setdefault('threads', os.environ.get('OPENBLAS_NUM_THREADS'))\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = hook\n"
        "import w4a8conv.cli\n"
        "assert seen == {'threads': '1'}, seen\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
