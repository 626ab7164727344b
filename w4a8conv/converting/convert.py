"""The conversion pipeline: plan, check, then stream every output shard to disk.

It owns the file I/O and the order of work; the math lives in ``processing``. Memory stays at a few
projections' tensors: pass-through tensors are copied file to file, processed tensors are written at
their planned offsets, and no shard is assembled in memory.

A conversion is a *job*: the plan is written to ``DST/.w4a8conv/job.json`` first, the output shards
are split into ``array_size`` disjoint shares that independent processes (a Slurm array, a
Kubernetes Indexed Job) may convert, and :func:`finalize` writes the index and description once all
shares are done. A single-process conversion is the same job with one share, so the bytes are the same.
"""

from __future__ import annotations

import errno
import functools
import gc
import importlib
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import EXIT_FAILURE, BadInputError, Terminated, W4A8ConvError, interruption
from ..formats.projection import Projection
from ..names import CONFIG_FILE, TOOL_SECTION
from ..planning.plan import ConversionPlan, OutputShard, PlanSummary
from ..planning.planner import SHARD_METADATA, build_plan
from ..progress import Progress
from ..reading.checkpoint import Checkpoint, open_checkpoint
from ..reading.filesystems import direct_io_by_default
from ..reading.job_file import resume_command
from ..reading.read_ahead import ReadAhead
from ..safetensors_io import ShardWriter, read_tensor, reads_direct
from .devices import resolve_device
from .jobs import (
    Choices,
    JobShare,
    check_output,
    continued_choices,
    copy_file_atomic,
    finalize,
    nearest_existing,
    start_share,
    write_canary,
    written_in_full,
)
from .preflight import check_scales_are_finite

__all__ = ["ConvertResult", "convert_checkpoint", "finalize"]

BLOCK_BYTES = 16 << 20  # a W4A8 weight larger than this is processed in blocks of output rows (docs/performance.md)


@dataclass
class ConvertResult:
    out_dir: Path
    summary: PlanSummary  # what the plan converts (this share's job array included)
    target: str
    seconds: float
    device: str
    direct_io: bool  # large output tensors were written with O_DIRECT
    direct_reads: bool  # large W4A8 weights were read with O_DIRECT
    checksums: bool  # the output has a sha256 manifest
    already_complete: bool = False  # --resume found it finished: nothing was written
    array_size: int = 1
    array_index: int = 0
    share_shards: tuple[str, ...] = ()  # the shards this job of an array wrote (all, without an array)
    empty_shares: tuple[int, ...] = ()  # jobs of the array with no shard to convert (more jobs than shards)

    def as_dict(self) -> dict:
        d = {**self.summary.as_dict(), **self.__dict__}
        del d["summary"]
        d["out_dir"] = str(self.out_dir)
        d["share_shards"], d["empty_shares"] = list(self.share_shards), list(self.empty_shares)
        d["finalize_needed"] = self.array_size > 1 and not self.already_complete
        return d


def check_paths(src: Path, dst: Path) -> None:
    """Refuse an output that is, holds or sits inside the input."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents or real_dst in real_src.parents:
        raise BadInputError(f"--out {dst}: must not be, contain or lie inside --in {src}")
    if dst.exists() and not dst.is_dir():
        raise BadInputError(f"--out {dst}: exists and is not a directory")
    parent = nearest_existing(dst)
    if not parent.is_dir():
        raise BadInputError(f"--out {dst}: {parent} is a file, so no directory can be made there")


def _check_arguments(array_size: int, array_index: int, overwrite: bool, resume: bool, workers: int) -> None:
    """What a conversion and its dry run both refuse in their arguments."""
    if workers < 1:
        raise BadInputError(f"--workers {workers}: need at least 1")
    if array_size < 1 or not 0 <= array_index < array_size:
        raise BadInputError(f"--array-index {array_index}: need 0 <= index < --array-size {array_size}")
    if overwrite and resume:
        raise BadInputError("--overwrite and --resume: choose one")


def prepare(
    src: Path,
    choices: Choices,
    array_size: int = 1,
    array_index: int = 0,
    notice: Callable[[str], None] | None = None,
) -> tuple[Checkpoint, ConversionPlan]:
    """Read and plan ``src`` as ``choices`` say, and read the scales of this share's modules; raise on the
    first problem (``inspect`` lists them all). ``notice`` hears what the user should know (an assumed
    model dtype)."""
    ckpt = open_checkpoint(src, choices.dtype)
    declared = ckpt.declared_dtype
    if choices.dtype is not None and declared is not None and choices.dtype != declared and not choices.force_dtype:
        raise BadInputError(
            f"--dtype {choices.dtype}: {src / CONFIG_FILE} declares torch_dtype {declared}, the dtype the model "
            f"serves in (W4A8 scales are rounded to it, and the plugin refuses any other); drop --dtype, or pass "
            f"--force-dtype to convert for {choices.dtype} and serve with --dtype {choices.dtype}"
        )
    if ckpt.dtype_assumed is not None and notice is not None:
        notice(dtype_notice(ckpt))
    if TOOL_SECTION in ckpt.description:
        raise BadInputError(f"{src}: already processed by w4a8conv; nothing to convert")
    plan = build_plan(ckpt, choices.target, array_size, choices.checksums)
    if plan.problems:
        more = len(plan.problems) - 1
        suffix = f" (and {more} more; run `w4a8conv inspect {src}` for all)" if more else ""
        raise BadInputError(plan.problems[0] + suffix)
    check_scales_are_finite(m for shard in _my_shards(plan, array_index) for m in shard.modules)
    return ckpt, plan


def dtype_notice(ckpt: Checkpoint) -> str:
    return (
        f"{ckpt.root}: {ckpt.dtype_assumed}: assuming the model serves in {ckpt.params_dtype_name} (a W4A8 "
        "Linear's scales are rounded to it, and the plugin refuses another serving dtype); --dtype sets it"
    )


def convert_checkpoint(
    src: Path | str,
    dst: Path | str,
    device: str = "cpu",
    target: str | None = None,
    workers: int = 1,
    array_size: int = 1,
    array_index: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    direct_io: bool | None = None,
    checksums: bool | None = None,
    progress: Progress | None = None,
    verify: Callable[[Path], Any] | None = None,
    dtype: str | None = None,
    notice: Callable[[str], None] | None = None,
    force_dtype: bool = False,
) -> ConvertResult:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into a processed one.

    Args:
        src: the input checkpoint directory; never written to.
        dst: the output directory; must be new or empty unless ``overwrite`` or ``resume``.
            The jobs of an array share it.
        device: ``cpu`` (default), ``cuda``, ``npu`` or ``auto``.
        target: the serving target (``w4a8conv.formats.targets``); None: what the conversion being resumed
            (or the array being joined) was started with, else the newest.
        workers: threads converting modules in parallel inside this process; output is identical.
        array_size: number of independent jobs sharing the conversion (a job array's size).
        array_index: this job's index, ``0 <= array_index < array_size``.
        overwrite: replace a previous w4a8conv output in ``dst``.
        resume: finish an interrupted conversion of the same input, redoing only unfinished shards.
        direct_io: read and write large tensors with O_DIRECT (the bytes are the same either way);
            None chooses reads by the input's filesystem and writes by the output's
            (:func:`~w4a8conv.reading.filesystems.direct_io_by_default`).
        checksums: hash every output file while writing it, for the ``w4a8conv.sha256`` manifest
            (about 0.5 CPU-seconds per GB); None: as the conversion was started, else True.
        progress: receives progress reports.
        verify: with ``array_size == 1``, checks the output before its description is published
            (see :func:`~w4a8conv.converting.jobs.finalize`); a failed check publishes nothing.
        dtype: the model dtype (``bfloat16``, ``float16``, ``float32``) instead of config.json's; None: as
            the conversion was started, else config.json's.
        notice: hears what the user should know (an assumed model dtype).
        force_dtype: convert for ``dtype`` even where config.json declares another.

    Returns:
        A summary of what was converted. With ``array_size > 1`` the output is complete only
        after :func:`finalize`.

    Raises:
        BadInputError: the input or the arguments are wrong; found before anything is written.
        W4A8ConvError: the conversion failed; the output lacks its description, so it does not
            look complete, and ``--resume`` finishes it.
    """
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    _check_arguments(array_size, array_index, overwrite, resume, workers)
    check_paths(src, dst)
    direct_reads = direct_io_by_default(src) if direct_io is None else direct_io
    if direct_io is None:
        direct_io = direct_io_by_default(dst)
    choices = continued_choices(dst, src, Choices(target, dtype, checksums, force_dtype), resume, array_size)
    ckpt, plan = prepare(src, choices, array_size, array_index, notice)
    torch_device = resolve_device(device)
    if not overwrite:  # before anything is written: a shortfall leaves --out as it was
        mine = [s for s in _my_shards(plan, array_index) if not written_in_full(dst / s.name, s.file_size)]
        _check_free_space(nearest_existing(dst), sum(s.file_size for s in mine), dst)
    share = start_share(dst, plan, array_index, overwrite=overwrite, resume=resume)
    if share is None:  # --resume found it finished
        return replace(
            _result(dst, started, torch_device, direct_io, direct_reads, plan, array_index), already_complete=True
        )
    report = progress or Progress()
    try:
        todo = [s for s in _my_shards(plan, array_index) if not share.is_complete(s.name)]
        if overwrite:  # what it replaces is gone now
            _check_free_space(dst, sum(s.file_size for s in todo))
        report.start(
            sum(i.nbytes for s in todo for i in s.passthrough) + sum(p.source_bytes for s in todo for p in s.modules),
            sum(len(s.modules) for s in todo),
        )
        if array_index == 0:
            for rel in ckpt.extra_files:
                copy_file_atomic(ckpt.root / rel, dst, rel)
            write_canary(plan, dst)
        converting = {s.name for s in todo}
        unhashed = [name for name in share.shard_names if name not in converting] if share.checksums else []
        _import_math_in_background()
        _convert_shards(todo, unhashed, share, torch_device, workers, direct_io, direct_reads, report)
        share.mark_done()
        if array_size == 1:
            finalize(dst, plan, verify)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _out_of_space(e, dst, src, plan, array_index) from None
    except (KeyboardInterrupt, Terminated) as stop:
        signal_name, code = interruption(stop)
        done = sum(share.is_complete(shard) for shard in share.shard_names)
        again = f"finish it with `{resume_command(dst, src, (array_size, array_index))}`"
        raise W4A8ConvError(
            f"--out {dst}: interrupted by {signal_name} with {done} of {len(share.shard_names)} shards written; "
            f"{again}",
            code,
        ) from None
    finally:
        report.finish()
        share.close()
    return _result(dst, started, torch_device, direct_io, direct_reads, plan, array_index)


def _result(
    dst: Path,
    started: float,
    device: str,
    direct_io: bool,
    direct_reads: bool,
    plan: ConversionPlan,
    array_index: int,
) -> ConvertResult:
    return ConvertResult(
        dst,
        summary=plan.summary,
        target=plan.target,
        seconds=time.monotonic() - started,
        device=device,
        direct_io=direct_io,
        direct_reads=direct_reads,
        checksums=plan.checksums,
        array_size=plan.array_size,
        array_index=array_index,
        share_shards=plan.shares[array_index],
        empty_shares=empty_shares(plan),
    )


def empty_shares(plan: ConversionPlan) -> tuple[int, ...]:
    """The jobs of an array left with no shard (more jobs than output shards)."""
    return tuple(i for i, share in enumerate(plan.shares) if not share)


def _import_math_in_background() -> None:
    """Import torch (about a second) beside the first copies.

    It starts only once the plan and the output directory are set up: the import holds the GIL for
    milliseconds at a time, and the set-up's many short system calls each waited for it. The import
    makes about 165,000 objects, which the cyclic garbage collector would walk again and again: it
    is held off until the import is done, and what exists then is frozen out of later collections
    (docs/performance.md, "Measurements behind the code").
    """
    collecting = gc.isenabled()
    gc.disable()

    def load() -> None:
        try:
            importlib.import_module(f"{__package__}.processing")
        finally:
            if collecting:
                gc.freeze()
                gc.enable()

    threading.Thread(target=load, daemon=True).start()


def plan_conversion(
    src: Path | str,
    dst: Path | str,
    target: str | None = None,
    array_size: int = 1,
    array_index: int = 0,
    checksums: bool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    device: str = "cpu",
    dtype: str | None = None,
    notice: Callable[[str], None] | None = None,
    force_dtype: bool = False,
) -> ConversionPlan:
    """What :func:`convert_checkpoint` would do, with every check it makes before writing, on both sides:
    the arguments (``--workers``, ``--device`` on this machine...), the input (headers, and the scales'
    values) and ``dst`` (what it holds, whether it can be written, free space), with the same messages
    and exit codes; writes nothing."""
    src, dst = Path(src), Path(dst)
    _check_arguments(array_size, array_index, overwrite, resume, workers)
    check_paths(src, dst)
    choices = continued_choices(dst, src, Choices(target, dtype, checksums, force_dtype), resume, array_size)
    plan = prepare(src, choices, array_size, array_index, notice)[1]
    resolve_device(device)
    if not check_output(dst, plan, overwrite=overwrite, resume=resume):
        mine = _my_shards(plan, array_index)
        needed = sum(s.file_size for s in mine if not written_in_full(dst / s.name, s.file_size))
        _check_free_space(nearest_existing(dst), needed, dst)
    return plan


def _my_shards(plan: ConversionPlan, array_index: int) -> list[OutputShard]:
    mine = set(plan.shares[array_index])
    return [shard for shard in plan.shards if shard.name in mine]


def _check_free_space(where: Path, needed: int, dst: Path | None = None) -> None:
    """Refuse (exit 2, before anything is written) when the filesystem holding ``where`` (``dst`` or,
    before it exists, its nearest ancestor) lacks ``needed`` bytes."""
    dst = dst or where
    free = shutil.disk_usage(where).free
    if needed > free:
        raise BadInputError(
            f"--out {dst}: needs {needed / 1e9:.2f} GB more but the filesystem has {free / 1e9:.2f} GB free; "
            "free space (or choose an --out with room), then run the command again"
        )


def _out_of_space(error: OSError, dst: Path, src: Path, plan: ConversionPlan, array_index: int) -> W4A8ConvError:
    """A write that found the disk full: the file, what is still to write, and how to finish."""
    unfinished = [s for s in _my_shards(plan, array_index) if not written_in_full(dst / s.name, s.file_size)]
    still = sum(s.file_size for s in unfinished)
    what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    again = f"`{resume_command(dst, src, (plan.array_size, array_index))}`"
    return W4A8ConvError(
        f"{error.filename or dst}: {what} while writing it; {still / 1e9:.2f} GB still to write "
        f"({len(unfinished)} of {len(plan.shares[array_index])} shards unfinished, "
        f"{shutil.disk_usage(nearest_existing(dst)).free / 1e9:.2f} GB free): free space, then {again}",
        EXIT_FAILURE,
    )


class _Completions:
    """Futures handed over as they finish, at a constant cost each. ``concurrent.futures.wait`` with
    FIRST_COMPLETED walks every pending future on every call: quadratic in a share's units, which a
    DeepSeek-R1 conversion counts in tens of thousands, all on the main thread, holding the GIL."""

    def __init__(self) -> None:
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()

    def watch(self, future: Future) -> Future:
        future.add_done_callback(self._done.put)
        return future

    def next(self) -> Future:
        while True:
            try:
                return self._done.get(timeout=0.5)  # a bounded wait keeps Ctrl-C and SIGTERM deliverable
            except queue.Empty:
                continue


def _convert_shards(
    shards: list[OutputShard],
    unhashed: list[str],
    share: JobShare,
    device: str,
    workers: int,
    direct_io: bool,
    direct_reads: bool,
    report: Progress,
) -> None:
    """Fill the shards with ``workers`` threads; each is fsynced, renamed and its hash saved after its last unit.

    Pass-through copies are queued first: they need no torch, so they overlap its import. Every unit
    writes a fixed byte range, so the result does not depend on ``workers`` or on timing.
    ``unhashed`` are shards finished by an earlier run whose checksum may still be missing.
    """
    dst = share.dst
    writers = {
        shard.name: ShardWriter(dst / shard.name, shard.entries, SHARD_METADATA, direct_io, share.checksums)
        for shard in shards
    }
    remaining = {shard.name: len(shard.passthrough) + len(shard.modules) for shard in shards}
    pool = ThreadPoolExecutor(workers, thread_name_prefix="w4a8conv")
    pending: dict[Future, tuple[str, str, str, int]] = {}
    completions = _Completions()

    def finish(shard_name: str) -> None:
        digest = writers.pop(shard_name).finish()
        if digest is not None:
            share.save_checksum(shard_name, digest)
        report.update("shard", shard_name, 0)

    try:
        copies = [(shard.name, info) for shard in shards for info in shard.passthrough]
        projections = [(shard.name, p) for shard in shards for p in shard.modules]
        # Sources read with O_DIRECT bypass the page cache, so hinting them would read them twice.
        sources = [[i for i in p.sources.values() if not reads_direct(i, direct_reads)] for _, p in projections]
        read_ahead = ReadAhead([[info] for _, info in copies] + sources)
        for i, (shard_name, info) in enumerate(copies):
            future = pool.submit(read_ahead.around, i, writers[shard_name].copy_tensor, info.name, info)
            pending[completions.watch(future)] = (shard_name, "copy", info.name, info.nbytes)
        for i, (shard_name, p) in enumerate(projections, start=len(copies)):
            future = pool.submit(
                read_ahead.around,
                i,
                _convert_projection,
                writers[shard_name],
                p,
                share.plan,
                device,
                workers,
                direct_reads,
            )
            pending[completions.watch(future)] = (shard_name, "module", p.prefix, p.source_bytes)
        for name in unhashed:
            if not share.has_checksum(name):
                pending[completions.watch(pool.submit(share.record_checksum, name))] = (name, "checksum", name, 0)
        for name in [name for name, count in remaining.items() if count == 0]:
            finish(name)
        while pending:
            future = completions.next()
            shard_name, event, name, nbytes = pending.pop(future)
            future.result()
            if event == "checksum":
                continue
            report.update(event, name, nbytes)
            remaining[shard_name] -= 1
            if remaining[shard_name] == 0:
                finish(shard_name)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # the writers hold no descriptor between writes
        for writer in writers.values():
            writer.abandon()
        raise
    finally:
        pool.shutdown(wait=True)


@functools.cache
def _configure_torch(workers: int) -> None:
    """With several worker threads, parallelism comes from them; torch's own threads would compete."""
    import torch

    if workers > 1:
        torch.set_num_threads(1)


def _convert_projection(
    writer: ShardWriter, projection: Projection, plan: ConversionPlan, device: str, workers: int, direct_reads: bool
) -> None:
    import torch

    from .processing import process_projection

    _configure_torch(workers)
    if device == "npu":
        from .npu import npu_pack_int4_to_int32

        pack_int4 = functools.partial(npu_pack_int4_to_int32, for_moe=projection.is_moe)
    else:
        from ..formats.packing import pack_int4_to_int32 as pack_int4

    params_dtype = getattr(torch, plan.params_dtype)
    # A weight larger than BLOCK_BYTES goes in blocks of output rows, so that memory does not grow with
    # it: every output row depends on its own source rows only, so the bytes are the same.
    rows = projection.rows_per_block(BLOCK_BYTES)
    for start in range(0, projection.out_features, rows):
        block = projection.row_block(start, rows)
        tensors = {role: read_tensor(info, direct_reads).to(device) for role, info in block.sources.items()}
        processed = process_projection(block, tensors, params_dtype, pack_int4, plan.serving_target)
        del tensors
        for name, tensor in processed.items():
            if rows >= projection.out_features:
                writer.write_tensor(name, tensor)
            else:
                writer.write_rows_of(name, tensor, start, projection.out_features)
