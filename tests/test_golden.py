"""The output is byte for byte what w4a8conv wrote before its sources and targets became modules.

``golden/sha256.json`` holds the first 16 hex digits of the sha256 of every file of the synthetic
inputs and their conversions, for every source layout and two model shapes, as written by the code
at 8b638f6 (before the restructuring of issue 13). Regenerate it only for a deliberate format change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from w4a8conv.convert import convert_checkpoint
from w4a8conv.sources import SOURCE_NAMES
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from .conftest import LEGACY_TARGET

GOLDEN = json.loads((Path(__file__).parent / "golden" / "sha256.json").read_text())
SPECS = {
    "default": SyntheticSpec(),
    "odd": SyntheticSpec(hidden=256, intermediate=128, experts=3, group_size=64, shards=2, seed=7),
}


def _digests(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_every_golden_case_is_a_registered_layout():
    assert {key.split("/")[1] for key in GOLDEN} == set(SOURCE_NAMES)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_synthetic_input_and_its_conversion_are_byte_identical_to_the_golden_run(case, tmp_path):
    spec_name, layout = case.split("/")
    src = write_checkpoint(tmp_path / "src", layout, SPECS[spec_name])
    assert _digests(src) == GOLDEN[case]["source"]
    dst = convert_checkpoint(src, tmp_path / "out", workers=3, target=LEGACY_TARGET).out_dir
    assert _digests(dst) == GOLDEN[case]["output"]
