"""Shared fixtures: one synthetic checkpoint per layout, and its conversion, built once per session."""

from __future__ import annotations

import fcntl
import importlib.util
import os

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.formats.sources import SOURCE_NAMES
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

# tests/engine needs the real vLLM and vllm-ascend: `make test-engine` runs it in a venv of its own.
collect_ignore = [] if importlib.util.find_spec("vllm_ascend") else ["engine"]
# tests/slurm starts a private Slurm cluster: `make test-slurm` runs it.
collect_ignore += [] if os.environ.get("W4A8CONV_TEST_SLURM") else ["slurm"]

SPEC = SyntheticSpec()
# What the tests written before the current-line target convert for: it serves every source layout.
LEGACY_TARGET = "vllm-ascend-0.23"


@pytest.fixture(scope="session")
def source_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    return {layout: write_checkpoint(root / layout, layout, SPEC) for layout in SOURCE_NAMES}


@pytest.fixture(scope="session")
def converted_checkpoints(source_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("converted")
    return {
        layout: convert_checkpoint(src, root / layout, target=LEGACY_TARGET).out_dir
        for layout, src in source_checkpoints.items()
    }


@pytest.fixture(params=SOURCE_NAMES)
def layout(request) -> str:
    return request.param


@pytest.fixture
def direct_io_calls(monkeypatch) -> list[tuple[str, str, int, int]]:
    """Spy on pwrite and preadv through O_DIRECT descriptors: (``read``/``write``, file, offset, length)."""
    calls: list[tuple[str, str, int, int]] = []
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def record(kind: str, fd: int, offset: int, nbytes: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append((kind, os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes))

    def pwrite(fd, data, offset):
        record("write", fd, offset, memoryview(data).nbytes)
        return real_pwrite(fd, data, offset)

    def preadv(fd, buffers, offset, *flags):
        record("read", fd, offset, sum(memoryview(b).nbytes for b in buffers))
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def cli(*args) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr. ``convert`` and ``inspect`` are given
    ``--target LEGACY_TARGET`` unless the call names a target (the default refuses mindie and per-group)."""
    args = [str(a) for a in args]
    if args and args[0] in ("convert", "inspect") and "--target" not in args:
        args += ["--target", LEGACY_TARGET]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def paste(message: str):
    """Run the last `w4a8conv ...` command a message prints, exactly as printed (as a user pastes it)."""
    import re
    import shlex

    commands = re.findall(r"`(w4a8conv [^`]+)`", message)
    assert commands, f"no command to paste in: {message}"
    return CliRunner().invoke(app, shlex.split(commands[-1])[1:])
