"""Mutate a valid tiny checkpoint's bytes at random: the tool must never crash with a traceback or hang.

A mutated output must also never pass `verify`: converted without a manifest, so that `verify`'s own
checks of every tensor, type and copied file are what catches the change.

`make test` runs a few hundred cases in seconds; `W4A8CONV_FUZZ=20` runs twenty times as many.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from .conftest import LEGACY_TARGET

runner = CliRunner()
SCALE = int(os.environ.get("W4A8CONV_FUZZ", "1"))  # the longer run: a multiple of the cases below
CASES = 150 * SCALE
OUTPUT_CASES = 60 * SCALE


@pytest.fixture(scope="module", params=["v1.0.0-per-group", "compressed-tensors"])
def pristine(request, tmp_path_factory) -> Path:
    """A description-described and a config-described (compressed-tensors) checkpoint."""
    spec = SyntheticSpec(hidden=64, intermediate=32, experts=2, moe_layers=1, dense_layers=1, group_size=16)
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", request.param, spec)


@pytest.fixture(scope="module")
def pristine_output(pristine, tmp_path_factory) -> Path:
    return convert_checkpoint(
        pristine, tmp_path_factory.mktemp("fuzz-out") / "out", checksums=False, target=LEGACY_TARGET
    ).out_dir


def mutate(root: Path, rng: random.Random) -> str:
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json"))
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    kind = rng.choice(["header", "anywhere", "truncate", "json"] if target.suffix == ".safetensors" else ["json"])
    if kind == "truncate":
        del data[rng.randrange(len(data)) :]
    else:
        n = int.from_bytes(data[:8], "little") + 8 if kind == "header" and len(data) > 8 else len(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(n, len(data)))] = rng.randrange(256)
    target.write_bytes(bytes(data))
    return f"{kind} {target.name}"


def _timeout(signum, frame):
    raise TimeoutError("the tool hung")


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_checkpoint_never_crashes(pristine, pristine_output, tmp_path, seed):
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    what = mutate(src, random.Random(seed))
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(30)
    try:
        for args in (
            ["inspect", str(src), "--json"],
            ["convert", "--in", str(src), "--out", str(tmp_path / "out")],
            ["verify", str(src), str(pristine_output)],
        ):
            result = runner.invoke(app, args)
            output = result.stdout + result.stderr
            assert result.exit_code in (0, 1, 2), f"{what}: {args[0]} exited {result.exit_code}"
            assert "Traceback" not in output and "internal error" not in output, f"{what}: {output}"
            assert result.exception is None or isinstance(result.exception, SystemExit), f"{what}: {result.exception!r}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("seed", range(OUTPUT_CASES))
def test_mutated_output_never_passes_verify(pristine, pristine_output, tmp_path, seed):
    out = tmp_path / "out"
    shutil.copytree(pristine_output, out)
    what = mutate(out, random.Random(seed))
    changed = [
        f.name for f in out.iterdir() if f.is_file() and f.read_bytes() != (pristine_output / f.name).read_bytes()
    ]
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(30)
    try:
        result = runner.invoke(app, ["verify", str(pristine), str(out), "--json"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), what
    assert result.exit_code in (0, 1, 2), what
    if changed:
        assert result.exit_code != 0, f"{what}: verify passed a changed {changed}"
    else:
        assert result.exit_code == 0, f"{what}: changed nothing, yet verify failed"
