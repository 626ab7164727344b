"""verify's check of the bytes around the tensors: every shard header, the index and the description must be
the bytes the conversion writes, manifest or not (whitespace, key order and shard metadata included).

The expected bytes come from the conversion plan (``planner``) and the header codec: layout, not math;
the tensor values are re-derived independently elsewhere (``modules``).
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..converting.jobs import has_manifest, json_bytes
from ..errors import BadInputError
from ..formats.canary import canary_chunks, canary_path, canary_sources, digest_of, with_digest
from ..names import CONFIG_FILE, DESCRIPTION_FILE, FORMAT_VERSION, TOOL_SECTION
from ..planning.planner import SHARD_METADATA, build_plan
from ..reading.checkpoint import Checkpoint
from ..safetensors_io import TensorInfo, layout_header
from .files import regular_file
from .report import VerifyReport


def check_canary(
    dst: Path, spec: dict, recorded: object, sources: list[TensorInfo], expected_digest: str, report: VerifyReport
) -> None:
    """The canary holds the source's tensors byte for byte, and the description records its digest."""
    path = canary_path(dst, spec)
    if not (path.exists() and regular_file(path)):
        report.problem(f"{path}: missing; the serving plugin checks the engine with it")
        return
    with open(path, "rb") as f:
        for chunk in canary_chunks(sources):
            if f.read(len(chunk)) != chunk:
                report.problem(f"{path}: not the source's tensors ({len(sources)}, {sources[0].name}...) byte for byte")
                return
        if f.read(1):
            report.problem(f"{path}: longer than the source's tensors")
            return
    digest = recorded.get("sha256") if isinstance(recorded, dict) else None
    if digest != expected_digest:
        report.problem(f"{dst / DESCRIPTION_FILE}: the canary's sha256 is {digest}, expected {expected_digest}")


def check_written_bytes(
    source: Checkpoint, dst: Path, description: dict, report: VerifyReport, paths: dict[str, Path] | None = None
) -> None:
    """``paths``: where files of the output are read from instead of ``dst / name`` (a description that
    ``finalize --verify`` has not published yet)."""
    paths = paths or {}
    section = description[TOOL_SECTION]
    if section.get("format_version") != FORMAT_VERSION or section.get("tool_version") != __version__:
        return  # another release wrote it: its bytes are its own (the values are still checked)
    try:
        plan = build_plan(source, section.get("target"), 1, has_manifest(description))
    except BadInputError:
        return  # an unknown target: reported with the description's keys
    if plan.problems:
        return  # the source is reported on its own
    description_expected = dict(plan.description)
    spec = description_expected[TOOL_SECTION].get("canary")
    if spec is not None:
        sources = canary_sources(plan.modules, spec)
        expected_digest = digest_of(canary_chunks(sources))
        check_canary(dst, spec, section.get("canary"), sources, expected_digest, report)
        description_expected = with_digest(description_expected, TOOL_SECTION, expected_digest)
    expected = {plan.index_name: json_bytes(plan.index), DESCRIPTION_FILE: json_bytes(description_expected)}
    if plan.served_config is not None:
        expected[CONFIG_FILE] = json_bytes(dict(plan.served_config))
        if not (dst / CONFIG_FILE).exists():
            report.problem(f"{dst / CONFIG_FILE}: missing; the output is served with it")
    for name, data in expected.items():
        path = paths.get(name, dst / name)
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
