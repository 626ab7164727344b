"""verify's check of the bytes around the tensors: every shard header, the index and the description must be
the bytes the conversion writes, manifest or not (whitespace, key order and shard metadata included).

The expected bytes come from the conversion plan (``planner``) and the header codec: layout, not math;
the tensor values are re-derived independently elsewhere (``modules``).
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..checkpoint import Checkpoint
from ..errors import BadInputError
from ..jobs import has_manifest, json_bytes
from ..names import CONFIG_FILE, DESCRIPTION_FILE, FORMAT_VERSION, TOOL_SECTION
from ..planner import SHARD_METADATA, build_plan
from ..safetensors_io import layout_header
from .files import regular_file
from .report import VerifyReport


def check_written_bytes(source: Checkpoint, dst: Path, description: dict, report: VerifyReport) -> None:
    section = description[TOOL_SECTION]
    if section.get("format_version") != FORMAT_VERSION or section.get("tool_version") != __version__:
        return  # another release wrote it: its bytes are its own (the values are still checked)
    try:
        plan = build_plan(source, section.get("target"), 1, has_manifest(description))
    except BadInputError:
        return  # an unknown target: reported with the description's keys
    if plan.problems:
        return  # the source is reported on its own
    expected = {plan.index_name: json_bytes(plan.index), DESCRIPTION_FILE: json_bytes(dict(plan.description))}
    if plan.served_config is not None:
        expected[CONFIG_FILE] = json_bytes(dict(plan.served_config))
        if not (dst / CONFIG_FILE).exists():
            report.problem(f"{dst / CONFIG_FILE}: missing; the output is served with it")
    for name, data in expected.items():
        path = dst / name
        if path.exists() and regular_file(path) and path.read_bytes() != data:
            report.problem(f"{path}: not the bytes the conversion writes")
    for shard in plan.shards:
        path = dst / shard.name
        if not (path.exists() and regular_file(path)):
            continue  # reported with the index
        header, _ = layout_header(shard.entries, SHARD_METADATA)
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                report.problem(f"{path}: its safetensors header is not the one the conversion writes")
