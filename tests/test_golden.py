"""The output is byte for byte what w4a8conv wrote before its sources and targets became modules, but for
the artifact contract that format 2 added to the description's ``w4a8conv`` section, and the canary
(issue 20): a new file of source tensors, recorded in the section and the manifest.

``golden/sha256.json`` holds the first 16 hex digits of the sha256 of every file of the synthetic
inputs and their conversions, for every source layout and two model shapes, as written by the code
at 8b638f6 (before the restructuring of issue 13); ``golden/sections_8b638f6.json`` that code's
``w4a8conv`` sections and the digest of each description without it. Regenerate them only for a
deliberate format change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.formats.sources import SOURCE_NAMES
from w4a8conv.names import CANARY_FILE, DESCRIPTION_FILE, MANIFEST_FILE, TOOL_SECTION
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

from .conftest import LEGACY_TARGET

GOLDEN = Path(__file__).parent / "golden"
DIGESTS = json.loads((GOLDEN / "sha256.json").read_text())
SECTIONS = json.loads((GOLDEN / "sections_8b638f6.json").read_text())
# The synthetic inputs as they were written at 8b638f6 (the "legacy" style; issue 16 made the default
# write what msModelSlim writes).
SPECS = {
    "default": SyntheticSpec(shards=3, style="legacy"),
    "odd": SyntheticSpec(hidden=256, intermediate=128, experts=3, group_size=64, shards=2, seed=7, style="legacy"),
}
# Format 2: the section names the target and the processing it mirrors (the artifact contract).
CONTRACT = {
    "format_version": 2,
    "target": "vllm-ascend-0.23",
    "engine": "vllm-ascend",
    "engine_releases": ">=0.9.0,<0.27",
    "upstream": "vllm-project/vllm-ascend v0.23.0 (5cb98caaadeff42b5b62b996e34bb2aaa29d20fd) "
    "vllm_ascend/quantization/methods/w4a8.py",
    "scale_bias_chunks": 16,
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _digest(p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()}


# Layouts added after 8b638f6, which has no output for them; each has its own exact tests.
NEWER_LAYOUTS = {"compressed-tensors"}


def test_every_golden_case_is_a_registered_layout():
    golden = {key.split("/")[1] for key in DIGESTS}
    assert golden == set(SOURCE_NAMES) - NEWER_LAYOUTS == {key.split("/")[1] for key in SECTIONS}


@pytest.mark.parametrize("case", sorted(DIGESTS))
def test_synthetic_input_and_its_conversion_are_byte_identical_to_the_golden_run(case, tmp_path):
    spec_name, layout = case.split("/")
    src = write_checkpoint(tmp_path / "src", layout, SPECS[spec_name])
    assert _digests(src) == DIGESTS[case]["source"]
    dst = convert_checkpoint(src, tmp_path / "out", workers=3, target=LEGACY_TARGET).out_dir
    got, expected = _digests(dst), dict(DIGESTS[case]["output"])
    for name in (DESCRIPTION_FILE, MANIFEST_FILE):
        got.pop(name), expected.pop(name)
    canary_digest = got.pop(CANARY_FILE)
    assert got == expected  # shards, index, copied files
    description = json.loads((dst / DESCRIPTION_FILE).read_text())
    section = description.pop(TOOL_SECTION)
    canary = section.pop("canary")
    assert canary["sha256"][:16] == canary_digest
    with safe_open(dst / CANARY_FILE, "pt") as f:
        assert sorted(f.keys()) == sorted(canary["tensors"])
        source = {}
        for path in src.glob("*.safetensors"):
            source.update(load_file(path))
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = f.get_tensor(name)
            assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name]), name
    assert _digest(json.dumps(description).encode()) == SECTIONS[case]["description_without_section"]
    old = SECTIONS[case]["section"]
    assert section == {**old, **CONTRACT}
    order = list(old)
    order[order.index("target") + 1 : order.index("target") + 1] = ["engine", "engine_releases", "upstream"]
    order.insert(order.index("scale_bias") + 1, "scale_bias_chunks")
    assert list(section) == order
    for line in (dst / MANIFEST_FILE).read_text().splitlines():  # what `sha256sum -c` checks
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((dst / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize(
    "case", ["default/mindie", "default/v1.0.0-per-group", "odd/v1.0.0-per-channel", "odd/compressed-tensors"]
)
def test_weights_processed_in_row_blocks_give_the_same_bytes(case, tmp_path, monkeypatch):
    """A weight above BLOCK_BYTES goes in blocks of output rows (so memory stays flat in its size): here
    every W4A8 weight of the synthetic checkpoints, in blocks of 8 to 16 rows."""
    spec_name, layout = case.split("/")
    src = write_checkpoint(tmp_path / "src", layout, SPECS[spec_name])
    whole = convert_checkpoint(src, tmp_path / "whole", workers=3, target=LEGACY_TARGET).out_dir
    monkeypatch.setattr("w4a8conv.converting.convert.BLOCK_BYTES", 2048)
    dst = convert_checkpoint(src, tmp_path / "out", workers=3, target=LEGACY_TARGET).out_dir
    assert _digests(dst) == _digests(whole)
