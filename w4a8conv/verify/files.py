"""verify's checks of whole files: manifest, index, description, copied files and pass-through tensors."""

from __future__ import annotations

import filecmp
import json
import math
import os
import random
import stat
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import BadInputError
from ..formats.sources import SourceLayout
from ..formats.targets import TARGETS
from ..names import (
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST_FILE,
    PREPACKED_TYPE,
    SCALE_BIAS_CHUNKS,
    STATE_DIR,
    TOOL_SECTION,
)
from ..progress import Progress
from ..safetensors_io import ShardHeader, TensorInfo, read_header, sha256_file
from .report import VerifyReport

_COMPARE_CHUNK = 16 << 20  # bytes of a pass-through tensor compared at a time


def tensor_types(description: dict, tensors: Container[str] = ()) -> dict[str, str]:
    """A description's per-tensor types: keys with a dot, and those naming one of ``tensors`` (DeepSeek-V4's
    ``hc_head_fn``); its top-level keys, such as ``version``, name no tensor.

    verify's own copy: it reads the description as a loader would, not as the planner does.
    """
    return {k: v for k, v in description.items() if isinstance(v, str) and ("." in k or k in tensors)}


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read ({e})") from e


def check_description_keys(
    path: Path,
    source_description: dict,
    description: dict,
    src: dict[str, TensorInfo],
    prefix: str,
    layout: SourceLayout | None,
    report: VerifyReport,
) -> None:
    """The keys a loader reads besides the types: the source's own, with the group size and layout its
    first W4A8 module implies (vllm-ascend reads ``group_size``; :mod:`w4a8conv.serving.runtime` the section's
    size and layout)."""
    try:
        weight = src[f"{prefix}.weight"]
        second = src.get(f"{prefix}.weight_scale_second")
        group_size = weight.shape[1] // second.shape[1] if second is not None else 0
    except (KeyError, IndexError, ZeroDivisionError) as e:
        report.problem(f"{prefix}: the source's shapes give no group size ({e!r})")
        return

    def others(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in tensor_types(d) and k != TOOL_SECTION}

    def compare(got: dict, expected: dict, where: str) -> None:
        missing = object()
        for key in sorted(set(expected) | set(got)):
            pair = got.get(key, missing), expected.get(key, missing)
            if pair[0] != pair[1]:
                shown = ["absent" if value is missing else repr(value) for value in pair]
                report.problem(f"{path}: {where}{key} is {shown[0]}, expected {shown[1]}")

    compare(others(description), {**others(source_description), "group_size": group_size}, "")
    section = description[TOOL_SECTION]
    expected = {
        "group_size": group_size,
        "source_layout": layout.name if layout is not None else "unknown",
        "source_version": source_description.get("version"),
        "quant_type": PREPACKED_TYPE,
    }
    if section.get("format_version") != 1:  # the artifact contract, since format 2: what a reader checks
        expected["format_version"] = FORMAT_VERSION
        expected["scale_bias_chunks"] = SCALE_BIAS_CHUNKS
        target = TARGETS.get(section.get("target"))
        if target is None:
            known = ", ".join(TARGETS)
            report.problem(f"{path}: {TOOL_SECTION}.target is {section.get('target')!r}, none of {known}")
        else:
            expected.update(target.section())
            if layout is not None and layout.name not in target.source_layouts:
                report.problem(f"{path}: {TOOL_SECTION}.target {target.name} does not serve a {layout.name} source")
    compare({key: section[key] for key in expected if key in section}, expected, f"{TOOL_SECTION}.")
    for key in sorted(set(expected) - set(section)):
        report.problem(f"{path}: {TOOL_SECTION}.{key} is absent, expected {expected[key]!r}")


def check_index(dst: Path, report: VerifyReport) -> dict[str, ShardHeader]:
    """The output's index against its shards' headers; what is missing or unreadable in the output is a
    problem of the conversion (exit 1), not bad input."""
    indexes = sorted(dst.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) != 1:
        report.problem(f"{dst}: expected one {INDEX_SUFFIX}, found {len(indexes)}")
        return {}
    try:
        index = load_json(indexes[0])
    except BadInputError as e:
        report.problem(e.message)
        return {}
    weight_map = index.get("weight_map", {}) if isinstance(index, dict) else {}
    headers = {}
    for name in sorted(set(weight_map.values())):
        try:
            if os.path.lexists(dst / name) and not regular_file(dst / name):
                raise BadInputError(f"{dst / name}: not a regular file (a link, FIFO or device)")
            headers[name] = read_header(dst / name)
        except BadInputError as e:  # truncated, missing or not safetensors at all
            report.problem(e.message)
            weight_map = {t: f for t, f in weight_map.items() if f != name}
    actual = {t: f for f, h in headers.items() for t in h.tensors}
    if actual != weight_map:
        wrong = sorted(set(actual.items()) ^ set(weight_map.items()))[:1]
        report.problem(f"{indexes[0]}: weight_map disagrees with the shards, e.g. {wrong[0][0]}")
    total = sum(i.nbytes for h in headers.values() for i in h.tensors.values())
    if index.get("metadata", {}).get("total_size") != total:
        report.problem(
            f"{indexes[0]}: total_size {index.get('metadata', {}).get('total_size')} but tensors hold {total}"
        )
    return headers


def check_manifest(
    dst: Path,
    sample: float,
    rng: random.Random,
    report: VerifyReport,
    progress: Progress,
    pool: ThreadPoolExecutor,
    paths: dict[str, Path] | None = None,
) -> None:
    """``paths``: files of the output read from elsewhere than ``dst / name`` (not published yet)."""
    paths = paths or {}
    path = dst / MANIFEST_FILE
    if not path.is_file():
        report.problem(f"{path}: checksum manifest missing")
        return
    listed = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = output_files(dst) | set(paths)
    for name in sorted(present - set(listed)):
        report.problem(f"{dst / name}: not in {MANIFEST_FILE}")

    def where(name: str) -> Path:
        return paths.get(name, dst / name)

    for name in sorted(set(listed) & present):
        if not regular_file(where(name)):
            report.problem(f"{dst / name}: not a regular file (a link, FIFO or device); the conversion writes files")
    names = sorted(name for name in set(listed) & present if regular_file(where(name)))
    if sample < 1:
        names = rng.sample(names, max(1, math.ceil(sample * len(names)))) if names else []
    for name in sorted(set(listed) - present):
        report.problem(f"{dst / name}: listed in {MANIFEST_FILE} but missing")
    for name, digest in zip(names, pool.map(sha256_file, [where(name) for name in names]), strict=True):
        report.files_hashed += 1
        if digest != listed[name]:
            report.problem(f"{dst / name}: sha256 differs from {MANIFEST_FILE}")
        progress.update("copy", name, where(name).stat().st_size)


def output_files(dst: Path) -> set[str]:
    """Every entry of an output that is not a directory, relative to it: files, hidden ones too, links,
    FIFOs...; but the manifest, and the state directory (reported on its own)."""
    entries = set()
    for directory, subdirectories, files in os.walk(dst):  # links to directories are entries, not followed
        here = Path(directory)
        if here == dst and STATE_DIR in subdirectories:
            subdirectories.remove(STATE_DIR)
        entries.update(str((here / name).relative_to(dst)) for name in files)
        entries.update(str((here / name).relative_to(dst)) for name in subdirectories if (here / name).is_symlink())
    entries.discard(MANIFEST_FILE)
    return entries


def regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself (not a link, FIFO or device), so that reading it ends."""
    return stat.S_ISREG(os.lstat(path).st_mode)


def check_copied_file(src: Path, out: Path, report: VerifyReport) -> None:
    """A file that the conversion copies as it is must be there, byte for byte; the manifest only says
    it has not changed since the conversion, and without one nothing else would look at it."""
    if not out.is_file():
        report.problem(f"{out}: missing (the input has {src})")
        return
    if not regular_file(out):
        report.problem(f"{out}: a link, not the copy of {src}")
        return
    try:
        same = filecmp.cmp(src, out, shallow=False)
    except OSError as e:
        report.problem(f"{e.filename}: cannot read: {e.strerror}")
        return
    if not same:
        report.problem(f"{out}: differs from {src}")


def check_passthrough(src: TensorInfo, out: TensorInfo | None, out_type, src_type, report: VerifyReport) -> None:
    if out is None:
        report.problem(f"{src.name}: in the source, missing from the output")
        return
    if (src.dtype, src.shape) != (out.dtype, out.shape):
        report.problem(
            f"{out.path}: tensor {out.name}: {out.dtype}{list(out.shape)}, source {src.dtype}{list(src.shape)}"
        )
        return
    if out_type != src_type:
        report.problem(f"{out.name}: described as {out_type!r}, source says {src_type!r}")
    if not _same_bytes(src, out):
        report.problem(f"{out.path}: tensor {out.name}: bytes differ from the source")


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two tensors of equal size hold the same bytes, compared a chunk at a time in reused buffers."""
    chunks = [bytearray(min(_COMPARE_CHUNK, a.nbytes)) for _ in range(2)]
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        for offset in range(0, a.nbytes, _COMPARE_CHUNK):
            size = min(_COMPARE_CHUNK, a.nbytes - offset)
            for f, info, chunk in ((fa, a, chunks[0]), (fb, b, chunks[1])):
                if os.preadv(f.fileno(), [memoryview(chunk)[:size]], info.begin + offset) != size:
                    return False  # a file ends inside the tensor
            whole = size == len(chunks[0])  # else the last, short chunk: compare copies of its part
            if not (chunks[0] == chunks[1] if whole else chunks[0][:size] == chunks[1][:size]):
                return False
    return True
