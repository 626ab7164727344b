"""``w4a8conv verify``: prove an output is a correct conversion of its source, without trusting the converter.

Everything is re-derived from the source with numpy, from W4A8_FORMATS.md, sharing no code with
``packing``, ``scales``, ``processing`` or the planner: each source layout's numpy oracle (found
through the source registry) rebuilds the operator words from the int4 values by shifts, where the
converter transposes bytes and reinterprets them; scales are re-encoded and compared bit for bit,
computed biases recomputed in float64. Only the file readers are shared.

Checks: checksum manifest (unless converted without one); index against the shard headers and sizes;
description against the index and the source (every type, and the keys a loader reads: group size,
layout, version); the files copied beside the shards (config, tokenizer...) and every pass-through
tensor byte for byte (``files``); every (or a sampled fraction of) W4A8 module value for value
(``modules``); with ``numeric``, the operators' CPU reference against a float computation (``numeric``).
"""

from __future__ import annotations

import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..converting.jobs import has_manifest
from ..errors import BadInputError
from ..names import (
    CONFIG_FILE,
    DESCRIPTION_FILE,
    INDEX_SUFFIX,
    MANIFEST_FILE,
    PREPACKED_TYPE,
    SOURCE_ROLES,
    STATE_DIR,
    TOOL_SECTION,
    W4A8_TYPE,
)
from ..progress import Progress
from ..reading.checkpoint import open_checkpoint, unfinished_output
from ..safetensors_io import TensorInfo
from . import modules as module_checks
from .arrays import source_layout, sources
from .files import (
    check_copied_file,
    check_description_keys,
    check_index,
    check_manifest,
    check_passthrough,
    load_json,
    output_files,
    tensor_types,
)
from .layout import check_written_bytes
from .numeric import numeric_checks
from .report import VerifyReport, in_order

# Threads checking files, tensors and modules at once (numpy and hashlib release the GIL); each
# holds one module's arrays, about 100 MB for a DeepSeek-R1 expert.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

__all__ = ["DEFAULT_WORKERS", "VerifyReport", "verify_conversion"]


def _refuse_a_wrong_source(src: Path, dst: Path, source) -> None:
    """What no conversion can come from, refused as ``convert`` refuses it (exit 2), before any check."""
    if src.resolve() == dst.resolve():
        raise BadInputError(f"{src}: the source and the output are the same directory; verify SRC OUT compares two")
    if TOOL_SECTION in source.description:
        raise BadInputError(f"{src}: is a w4a8conv output, not a source; give the checkpoint it was converted from")
    if not any(t == W4A8_TYPE for t in tensor_types(source.description).values()):
        raise BadInputError(f"{src}: no tensor is {W4A8_TYPE}: not a W4A8 source checkpoint, nothing was converted")


def verify_conversion(
    src: Path | str,
    dst: Path | str,
    sample: float = 1.0,
    seed: int = 0,
    numeric: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    unpublished_description: Path | None = None,
) -> VerifyReport:
    """Check that ``dst`` is a correct conversion of ``src``.

    Args:
        src: the source checkpoint.
        dst: the converted checkpoint.
        sample: fraction of W4A8 modules (and of files for the checksums) to check; 1.0 checks all.
        seed: chooses the sample (and the random activations of ``numeric``).
        numeric: also run the CPU reference of the Ascend operators (``w4a8conv.serving.reference``) on the
            output's tensors with random int8 activations, and compare with a float computation
            from the source's int4 values and scales, for every checked Linear and MoE layer.
        progress: receives a report per file hashed, tensor compared and module checked.
        workers: threads checking in parallel (default :data:`DEFAULT_WORKERS`); the report is the
            same for any number.
        unpublished_description: ``finalize --verify``'s description, not yet at its place in ``dst``
            (the conversion state is still there): checked as if it were.

    Returns:
        A report; ``ok`` is False and ``problems`` says why when anything is wrong.

    Raises:
        BadInputError: when ``src`` or ``dst`` cannot be read at all.
    """
    if not 0 < sample <= 1:
        raise BadInputError(f"--sample {sample}: must be in (0, 1]")
    if workers is not None and workers < 1:
        raise BadInputError(f"--workers {workers}: need at least 1")
    src, dst = Path(src), Path(dst)
    report = VerifyReport()
    source = open_checkpoint(src)
    paths = {DESCRIPTION_FILE: unpublished_description} if unpublished_description is not None else {}
    if not paths and not (dst / DESCRIPTION_FILE).exists() and (dst / STATE_DIR).is_dir():
        raise BadInputError(unfinished_output(dst))
    _refuse_a_wrong_source(src, dst, source)
    description = load_json(paths.get(DESCRIPTION_FILE, dst / DESCRIPTION_FILE))
    if not isinstance(description, dict) or not isinstance(description.get(TOOL_SECTION), dict):
        raise BadInputError(f"{dst / DESCRIPTION_FILE}: not a finished w4a8conv output")
    section = description[TOOL_SECTION]
    if (dst / STATE_DIR).exists() and not paths:
        report.problem(f"{dst / STATE_DIR}: conversion state left behind; the output was not finalized")
    rng = random.Random(seed)
    progress = progress or Progress()
    headers = check_index(dst, report)
    out_tensors = {name: info for h in headers.values() for name, info in h.tensors.items()}
    src_types = tensor_types(source.description, source.tensors)
    prefixes = sorted(n[: -len(".weight")] for n, t in src_types.items() if t == W4A8_TYPE and n.endswith(".weight"))
    consumed = {f"{p}.{r}" for p in prefixes for r in SOURCE_ROLES}
    out_types = tensor_types(description, out_tensors)
    report.modules_total = len(prefixes)
    chosen = prefixes if sample >= 1 else rng.sample(prefixes, max(1, math.ceil(sample * len(prefixes))))
    # What is read: every output file the manifest lists is hashed (shards, index, canary...), then the source.
    hashed = [dst / name for name in output_files(dst) if (dst / name).is_file() and not (dst / name).is_symlink()]
    # ...and the source's tensors: the pass-through ones and those of the modules checked (not its headers).
    source_bytes = sum(info.nbytes for name, info in source.tensors.items() if name not in consumed)
    source_bytes += sum(info.nbytes for prefix in chosen for _, info in sources(prefix, source.tensors))
    progress.start(sum(path.stat().st_size for path in hashed) + source_bytes, len(chosen))
    # Every output tensor is typed but those the source left untyped (GLM-5's rot.weight), copied as they are.
    untyped = {name for name in source.tensors if name not in src_types and name not in consumed}
    differ = (set(out_types) - set(out_tensors)) | ((set(out_tensors) - set(out_types)) ^ untyped)
    if differ:
        report.problem(f"{dst / DESCRIPTION_FILE}: types and tensors differ, e.g. {sorted(differ)[0]}")
    for name in sorted(set(src_types) - set(source.tensors)):
        report.problem(f"{source.description_path}: lists tensor {name}, which no shard holds")
    modules = set(prefixes)
    for name, quant_type in sorted(out_types.items()):
        # a serving engine picks the processed loading by this type (headers only: checked in full)
        if name.rpartition(".")[0] in modules and quant_type != PREPACKED_TYPE:
            report.problem(f"{dst / DESCRIPTION_FILE}: {name} is described as {quant_type!r}, not {PREPACKED_TYPE!r}")
    if prefixes:
        try:
            layout = source_layout(prefixes[0], source.tensors)
        except (KeyError, IndexError):
            layout = None
        converted_from = section.get("source_layout")
        if layout is not None and converted_from not in (None, layout.name):
            report.problem(
                f"{src}: a {layout.name} checkpoint, but {dst} was converted from a {converted_from} one: "
                "not its source (the problems after this one follow from it)",
                first=True,
            )
        path = dst / DESCRIPTION_FILE
        check_description_keys(path, source.description, description, source.tensors, prefixes[0], layout, report)

    def check_copy(info: TensorInfo, found: VerifyReport) -> None:
        check_passthrough(info, out_tensors.get(info.name), out_types.get(info.name), src_types.get(info.name), found)

    def check_module(prefix: str, found: VerifyReport) -> None:
        try:
            module_checks.check_module(prefix, source.tensors, out_tensors, section, found)
        except (KeyError, IndexError, ValueError) as e:
            found.problem(f"{prefix}: cannot be checked ({e})")

    with ThreadPoolExecutor(workers or DEFAULT_WORKERS, thread_name_prefix="verify") as pool:
        if not has_manifest(description) and not (dst / MANIFEST_FILE).exists():
            report.manifest = False
            # what the manifest check would flag as unlisted, so that the verdict does not depend on it
            written = {*headers, DESCRIPTION_FILE, *(p.name for p in dst.glob(f"*{INDEX_SUFFIX}"))}
            written |= {CONFIG_FILE} if source.served_config is not None else set()
            written |= {section["canary"]["file"]} if isinstance(section.get("canary"), dict) else set()
            for name in sorted(output_files(dst) - written - {str(rel) for rel in source.extra_files}):
                report.problem(f"{dst / name}: not part of the conversion")
        else:
            check_manifest(dst, sample, rng, report, progress, pool, paths)
        check_written_bytes(source, dst, description, report, paths)
        if source.served_config is not None:
            report.other_files_checked += 1  # config.json, written for serving: its bytes checked above
        for rel in source.extra_files:
            report.other_files_checked += 1
            check_copied_file(src / rel, dst / rel, report)
        passthrough = [info for name, info in sorted(source.tensors.items()) if name not in consumed]
        for info in in_order(pool, passthrough, check_copy, report):
            report.passthrough_checked += 1
            progress.update("copy", info.name, info.nbytes)
        for prefix in in_order(pool, chosen, check_module, report):
            report.modules_checked += 1
            progress.update("module", prefix, sum(info.nbytes for _, info in sources(prefix, source.tensors)))
    if numeric and report.ok:
        numeric_checks(dst, chosen, source.tensors, section, np.random.default_rng(seed), report)
    return report
