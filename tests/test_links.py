"""Nothing under --out is followed: links planted there are refused or replaced, never written through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import STATE_DIR

from .conftest import LEGACY_TARGET, cli


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag", [None, "--overwrite", "--resume"])
def test_a_state_directory_that_is_a_link_is_refused_and_its_target_untouched(source_checkpoints, tmp_path, flag):
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["mindie"], src)
    victim = src / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    before = _tree(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).symlink_to(victim)
    code, _, stderr = cli("convert", "--in", src, "--out", out, *([flag] if flag else []))
    assert code == 2 and f"{out / STATE_DIR}: is a link; w4a8conv follows no link inside --out" in stderr
    assert _tree(src) == before
    code, _, stderr = cli("finalize", out)
    assert code == 2 and "is a link" in stderr and _tree(src) == before


def test_a_link_planted_where_a_shard_is_written_is_replaced_not_followed(source_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    out = tmp_path / "out"
    convert_checkpoint(src, out, array_size=2, array_index=0, target=LEGACY_TARGET)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"mine")
    missing = sorted(p.name for p in src.glob("*-0000?-of-*.safetensors") if not (out / p.name).exists())
    for name in missing:
        (out / f"{name}.partial").symlink_to(victim)
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "1")
    assert code == 0, stderr
    assert victim.read_bytes() == b"mine" and missing and all((out / name).is_file() for name in missing)


def test_a_subdirectory_link_for_copied_files_is_refused(source_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source_checkpoints["v1.0.0-per-channel"], src)
    assert (src / "optional" / "quarot.safetensors").is_file()  # QuaRot's rotation, as msModelSlim writes it
    out = tmp_path / "out"
    convert_checkpoint(src, out, array_size=2, array_index=1, target=LEGACY_TARGET)  # no side files in share 1
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / "optional").symlink_to(victim)
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "0")
    assert code == 2 and f"{out / 'optional'}: is a link; w4a8conv follows no link inside --out" in stderr
    assert os.listdir(victim) == []
