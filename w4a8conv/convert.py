"""The conversion pipeline: plan, check, then stream every output shard to disk.

It owns the file I/O and the order of work; the math lives in ``processing``. Memory stays at a few
projections' tensors: pass-through tensors are copied file to file, processed tensors are written at
their planned offsets, and no shard is assembled in memory.

A conversion is a *job*: the plan is written to ``DST/.w4a8conv/job.json`` first, the output shards
are split into ``num_workers`` disjoint shares that independent processes (a Slurm array, a
Kubernetes Indexed Job) may convert, and :func:`finalize` writes the index and description once all
shares are done. A single-process conversion is the same job with one share, so the bytes are the same.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoint import DESCRIPTION_FILE, INDEX_SUFFIX, Checkpoint, open_checkpoint
from .devices import resolve_device
from .errors import EXIT_FAILURE, BadInputError, W4A8ConvError
from .layouts import PREPACKED_TYPE, PROCESSED_FORMAT
from .output import Progress
from .plan import TOOL_SECTION, Plan, Projection, build_plan, natural_key, tensor_entries
from .safetensors_io import OutputEntry, ShardWriter, TensorInfo, read_tensor

FORMAT_VERSION = 1


@dataclass
class ConvertResult:
    out_dir: Path
    format: str
    group_size: int | None
    modules: int
    moe_layers: int
    experts: int
    shards: int
    input_bytes: int
    output_bytes: int
    seconds: float
    device: str

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


def check_paths(src: Path, dst: Path) -> None:
    """Refuse an output that is, holds or sits inside the input."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents or real_dst in real_src.parents:
        raise BadInputError(f"--out {dst}: must not be, contain or lie inside --in {src}")
    if dst.exists() and not dst.is_dir():
        raise BadInputError(f"--out {dst}: exists and is not a directory")


def prepare(src: Path) -> tuple[Checkpoint, Plan]:
    """Read and plan ``src``; raise on the first problem (``inspect`` lists them all)."""
    ckpt = open_checkpoint(src)
    plan = build_plan(ckpt)
    if plan.format == PROCESSED_FORMAT:
        raise BadInputError(f"{src}: already processed by w4a8conv; nothing to convert")
    if plan.problems:
        more = len(plan.problems) - 1
        suffix = f" (and {more} more; run `w4a8conv inspect {src}` for all)" if more else ""
        raise BadInputError(plan.problems[0] + suffix)
    return ckpt, plan


STATE_DIR = ".w4a8conv"
JOB_FILE = "job.json"


@dataclass
class OutputShard:
    """One output file and the work that fills it."""

    name: str
    entries: list[OutputEntry]
    passthrough: list[TensorInfo]
    projections: list[Projection]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def output_shards(plan: Plan) -> list[OutputShard]:
    shards = {name: OutputShard(name, entries, [], []) for name, entries in plan.shard_entries.items()}
    for info in plan.passthrough:
        shards[info.path.name].passthrough.append(info)
    for projection in plan.projections:
        shards[projection.shard].projections.append(projection)
    return list(shards.values())


def assign_shares(shards: list[OutputShard], num_workers: int) -> list[list[str]]:
    """Split shards into ``num_workers`` disjoint shares of similar bytes; the same for every caller.

    Largest shard first to the share with the fewest bytes (ties: lower index), so every job of an
    array computes the same split from the same plan.
    """
    shares: list[list[str]] = [[] for _ in range(num_workers)]
    loads = [0] * num_workers
    for shard in sorted(shards, key=lambda s: (-s.nbytes, natural_key(s.name))):
        target = min(range(num_workers), key=lambda i: (loads[i], i))
        shares[target].append(shard.name)
        loads[target] += shard.nbytes
    return [sorted(share, key=natural_key) for share in shares]


def job_description(ckpt: Checkpoint, plan: Plan, num_workers: int) -> dict:
    """Everything :func:`finalize` needs, fixed before any shard is written."""
    shards = output_shards(plan)
    return {
        "tool_version": __version__,
        "source": str(ckpt.root.resolve()),
        "num_workers": num_workers,
        "shares": assign_shares(shards, num_workers),
        "shards": {s.name: s.nbytes for s in sorted(shards, key=lambda s: natural_key(s.name))},
        "extra_files": [str(p) for p in ckpt.extra_files],
        "index_name": f"{ckpt.prefix}{INDEX_SUFFIX}",
        "index": {
            "metadata": {"total_size": plan.output_bytes},
            "weight_map": dict(
                sorted(
                    ((e.name, shard) for shard, entries in plan.shard_entries.items() for e in entries),
                    key=lambda kv: natural_key(kv[0]),
                )
            ),
        },
        "description": processed_description(ckpt, plan),
        "summary": {
            "format": plan.format,
            "group_size": plan.group_size,
            "modules": len(plan.projections),
            "moe_layers": len(plan.moe_layers),
            "experts": plan.num_experts,
            "shards": len(shards),
            "input_bytes": ckpt.total_bytes,
            "output_bytes": plan.output_bytes,
        },
    }


def convert_checkpoint(
    src: Path | str,
    dst: Path | str,
    device: str = "cpu",
    workers: int = 1,
    num_workers: int = 1,
    worker_index: int = 0,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into a processed one.

    Args:
        src: the input checkpoint directory; never written to.
        dst: the output directory. With ``num_workers=1`` it must not exist or be empty; the jobs of
            an array share it.
        device: ``cpu`` (default), ``cuda``, ``npu`` or ``auto``.
        workers: threads converting modules in parallel inside this process; output is identical.
        num_workers: number of independent jobs sharing the conversion (a job array's size).
        worker_index: this job's index, ``0 <= worker_index < num_workers``.
        progress: receives progress reports.

    Returns:
        A summary of what was converted. With ``num_workers > 1`` the output is complete only
        after :func:`finalize`.

    Raises:
        BadInputError: the input is wrong (nothing is written when this is found while planning).
        W4A8ConvError: the conversion failed; the output lacks its index and description, so it
            does not look complete.
    """
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise BadInputError(f"--worker-index {worker_index}: need 0 <= index < --num-workers {num_workers}")
    if workers < 1:
        raise BadInputError(f"--workers {workers}: need at least 1")
    check_paths(src, dst)
    ckpt, plan = prepare(src)
    # torch takes about a second to import: load it beside the planning and the first copies.
    threading.Thread(target=importlib.import_module, args=(f"{__package__}.processing",), daemon=True).start()
    torch_device = resolve_device(device)
    job = job_description(ckpt, plan, num_workers)
    _start_job(dst, job)

    mine = set(job["shares"][worker_index])
    shards = [s for s in output_shards(plan) if s.name in mine]
    report = progress or Progress()
    report.start(
        sum(i.nbytes for s in shards for i in s.passthrough)
        + sum(_source_bytes(p) for s in shards for p in s.projections),
        sum(len(s.projections) for s in shards),
    )
    try:
        if worker_index == 0:
            for rel in ckpt.extra_files:
                _copy_file(ckpt.root / rel, dst / rel)
        _convert_shards(shards, dst, torch_device, ckpt.params_dtype_name, workers, report)
        _write_json(dst / STATE_DIR / f"share-{worker_index}-of-{num_workers}.json", {"shards": sorted(mine)})
        if num_workers == 1:
            finalize(dst)
    finally:
        report.finish()
    summary = job["summary"]
    return ConvertResult(
        out_dir=dst,
        seconds=time.monotonic() - started,
        device=str(torch_device),
        **summary,
    )


def _start_job(dst: Path, job: dict) -> None:
    """Create ``dst`` and record the job; refuse a directory that holds anything else."""
    state = dst / STATE_DIR
    job_file = state / JOB_FILE
    if job_file.is_file():
        if json.loads(job_file.read_text()) != json.loads(json.dumps(job)):
            raise BadInputError(f"--out {dst}: holds a different conversion in progress; choose a new directory")
        if job["num_workers"] == 1:
            raise BadInputError(f"--out {dst}: holds an unfinished conversion; choose a new directory")
        return
    if dst.exists() and any(p.name != STATE_DIR for p in dst.iterdir()):
        raise BadInputError(f"--out {dst}: exists and is not an empty directory; choose a new one")
    state.mkdir(parents=True, exist_ok=True)
    _write_json(job_file, job)


def _source_bytes(projection: Projection) -> int:
    return sum(i.nbytes for i in projection.sources.values())


def _convert_shards(
    shards: list[OutputShard], dst: Path, device: str, params_dtype: str, workers: int, report: Progress
) -> None:
    """Fill the shards with ``workers`` threads; each shard is fsynced and renamed once its last unit is done.

    Pass-through copies are queued first: they need no torch, so they overlap its import. The fsync
    runs here while the workers go on. Every unit writes a fixed byte range, so the result does not
    depend on ``workers`` or on timing.
    """
    writers = {shard.name: ShardWriter(dst / shard.name, shard.entries, _SHARD_METADATA) for shard in shards}
    remaining = {shard.name: len(shard.passthrough) + len(shard.projections) for shard in shards}
    pool = ThreadPoolExecutor(workers, thread_name_prefix="w4a8conv")
    try:
        units: dict[Future, tuple[str, str, str, int]] = {}
        for shard in shards:
            for info in shard.passthrough:
                future = pool.submit(writers[shard.name].copy_tensor, info.name, info)
                units[future] = (shard.name, "copy", info.name, info.nbytes)
        for shard in shards:
            for p in shard.projections:
                future = pool.submit(_convert_projection, writers[shard.name], p, device, params_dtype, workers)
                units[future] = (shard.name, "module", p.prefix, _source_bytes(p))
        for name in [name for name, count in remaining.items() if count == 0]:
            writers.pop(name).finish()
        for future in as_completed(units):
            shard_name, event, name, nbytes = units[future]
            future.result()
            report.update(event, name, nbytes)
            remaining[shard_name] -= 1
            if remaining[shard_name] == 0:
                writers.pop(shard_name).finish()
                report.update("shard", shard_name, 0)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        pool.shutdown(wait=True)


_SHARD_METADATA = {"format": "pt", "converted_by": f"w4a8conv {__version__}"}


@functools.cache
def _configure_torch(workers: int) -> None:
    """With several worker threads, parallelism comes from them; torch's own threads would compete."""
    import torch

    if workers > 1:
        torch.set_num_threads(1)


def _convert_projection(
    writer: ShardWriter, projection: Projection, device: str, params_dtype: str, workers: int
) -> None:
    import torch

    from .processing import process_projection

    _configure_torch(workers)
    if device == "npu":
        from .npu import npu_pack_int4_to_int32

        pack_int4 = functools.partial(npu_pack_int4_to_int32, for_moe=projection.is_moe)
    else:
        from .packing import pack_int4_to_int32 as pack_int4

    tensors = {role: read_tensor(info).to(device) for role, info in projection.sources.items()}
    for name, tensor in process_projection(projection, tensors, getattr(torch, params_dtype), pack_int4).items():
        writer.write_tensor(name, tensor)


def finalize(dst: Path | str) -> dict:
    """Write the index and description once every share of a job is done; refuse, naming what is missing.

    Returns:
        The job's summary.
    """
    dst = Path(dst)
    job_file = dst / STATE_DIR / JOB_FILE
    if not job_file.is_file():
        if (dst / DESCRIPTION_FILE).is_file():
            raise BadInputError(f"{dst}: already finalized")
        raise BadInputError(f"{dst}: no conversion in progress here ({STATE_DIR}/{JOB_FILE} is missing)")
    job = json.loads(job_file.read_text())
    n = job["num_workers"]
    missing = [i for i in range(n) if not (dst / STATE_DIR / f"share-{i}-of-{n}.json").is_file()]
    if missing:
        raise W4A8ConvError(
            f"{dst}: shares {', '.join(map(str, missing))} of {n} (--worker-index) are not finished", EXIT_FAILURE
        )
    for name, size in job["shards"].items():
        path = dst / name
        if not path.is_file() or path.stat().st_size < size:
            raise W4A8ConvError(f"{path}: shard missing or incomplete although its share is marked done")
    for rel in job["extra_files"]:
        if not (dst / rel).is_file():
            raise W4A8ConvError(f"{dst / rel}: missing although share 0 is marked done")
    _write_json(dst / job["index_name"], job["index"])
    _write_json(dst / DESCRIPTION_FILE, job["description"])
    shutil.rmtree(dst / STATE_DIR)
    _fsync_dir(dst)
    return job["summary"]


def processed_description(ckpt: Checkpoint, plan: Plan) -> dict:
    """The source description with processed tensors re-typed and a section recording what was done."""
    consumed = {info.name for p in plan.projections for info in p.sources.values()}
    entries = tensor_entries(ckpt.description)
    description = {k: v for k, v in ckpt.description.items() if k not in entries}
    description["group_size"] = plan.group_size
    for name, quant_type in entries.items():
        if name not in consumed:
            description[name] = quant_type
    for projection in plan.projections:
        for entry in projection.outputs():
            description[entry.name] = PREPACKED_TYPE
    description[TOOL_SECTION] = {
        "tool": "w4a8conv",
        "tool_version": __version__,
        "format_version": FORMAT_VERSION,
        "source_layout": plan.format,
        "source_version": ckpt.description.get("version"),
        "group_size": plan.group_size,
        "quant_type": PREPACKED_TYPE,
        "params_dtype": ckpt.params_dtype_name,
        "target": "vllm-ascend 0.23 process_weights_after_loading",
        "scale_bias": "float32 [out, chunks]; a tensor-parallel rank sums the chunks of its input slice",
    }
    return dict(sorted(description.items(), key=lambda kv: natural_key(kv[0])))


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a unique temporary name, fsync, rename (safe with concurrent jobs)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
