"""The output directory as a job: its plan on disk, shares, lock, resume, checksums and finalize.

A conversion writes ``DST/.w4a8conv/job.json`` (everything :func:`finalize` needs) before any shard.
Shards are written as ``<name>.partial``, fsynced and renamed, so a shard under its final name is
complete; a killed or failed conversion resumes by redoing only the shards that are not. The
checksum manifest, the index and, last of all, the description are written by :func:`finalize`:
a directory without the description is visibly unfinished. Nothing here knows about int4.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoint import DESCRIPTION_FILE, INDEX_SUFFIX, Checkpoint
from .errors import EXIT_FAILURE, BadInputError, W4A8ConvError
from .layouts import PREPACKED_TYPE
from .plan import TOOL_SECTION, Plan, Projection, natural_key, tensor_entries
from .safetensors_io import OutputEntry, TensorInfo, sha256_file

STATE_DIR = ".w4a8conv"
JOB_FILE = "job.json"
SUMS_DIR = "sums"
MANIFEST_FILE = "w4a8conv.sha256"  # `sha256sum -c w4a8conv.sha256` checks it too
FORMAT_VERSION = 1


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


def processed_description(ckpt: Checkpoint, plan: Plan, checksums: bool = True) -> dict:
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
        "checksum_manifest": MANIFEST_FILE if checksums else None,
    }
    return dict(sorted(description.items(), key=lambda kv: natural_key(kv[0])))


def job_description(ckpt: Checkpoint, plan: Plan, num_workers: int, checksums: bool = True) -> dict:
    """Everything :func:`finalize` needs, fixed before any shard is written.

    ``checksums``: hash every output file for the manifest (``w4a8conv.sha256``), as the
    description then says; every job of an array must agree, as the manifest lists all shares' files.
    """
    shards = output_shards(plan)
    weight_map = ((e.name, shard) for shard, entries in plan.shard_entries.items() for e in entries)
    return {
        "tool_version": __version__,
        "source": str(ckpt.root.resolve()),
        "num_workers": num_workers,
        "shares": assign_shares(shards, num_workers),
        "shards": _shard_file_sizes(shards),
        "extra_files": [str(p) for p in ckpt.extra_files],
        "index_name": f"{ckpt.prefix}{INDEX_SUFFIX}",
        "index": {
            "metadata": {"total_size": plan.output_bytes},
            "weight_map": dict(sorted(weight_map, key=lambda kv: natural_key(kv[0]))),
        },
        "description": processed_description(ckpt, plan, checksums),
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


def _shard_file_sizes(shards: list[OutputShard]) -> dict[str, int]:
    from .safetensors_io import layout_header

    sizes = {}
    for shard in sorted(shards, key=lambda s: natural_key(s.name)):
        header, _ = layout_header(shard.entries, SHARD_METADATA)
        sizes[shard.name] = len(header) + shard.nbytes
    return sizes


SHARD_METADATA = {"format": "pt", "converted_by": f"w4a8conv {__version__}"}


class JobShare:
    """This process's share of a job in an output directory, held under a lock until closed."""

    def __init__(self, dst: Path, job: dict, worker_index: int, lock_fd: int):
        self.dst = dst
        self.job = job
        self.worker_index = worker_index
        self._lock_fd = lock_fd
        self.state = dst / STATE_DIR

    @property
    def shard_names(self) -> list[str]:
        return self.job["shares"][self.worker_index]

    @property
    def checksums(self) -> bool:
        return has_manifest(self.job["description"])

    def is_complete(self, shard: str) -> bool:
        """A shard under its final name and size was fsynced before its rename: it is complete."""
        path = self.dst / shard
        return path.is_file() and path.stat().st_size == self.job["shards"][shard]

    def has_checksum(self, shard: str) -> bool:
        return (self.state / SUMS_DIR / f"{shard}.sha256").is_file()

    def record_checksum(self, shard: str) -> None:
        """Hash a shard an earlier run finished without saving its hash, for the manifest."""
        self.save_checksum(shard, sha256_file(self.dst / shard))

    def save_checksum(self, shard: str, digest: str) -> None:
        (self.state / SUMS_DIR).mkdir(exist_ok=True)
        write_atomic(self.state / SUMS_DIR / f"{shard}.sha256", f"{digest}\n".encode())

    def remove_stale_partials(self) -> None:
        """Delete temporary files a killed run of this share left (never another share's)."""
        owned = [*self.shard_names, *(f"{SUMS_DIR}/{name}.sha256" for name in self.shard_names)]
        owned.append(f"share-{self.worker_index}-of-{self.job['num_workers']}.json")
        if self.worker_index == 0:
            # Not the job file's: every job of an array writes it, and one starting beside this one may
            # be writing it right now. Leftovers of a killed run go when finalize removes the state.
            owned += [*self.job["extra_files"], self.job["index_name"], DESCRIPTION_FILE, MANIFEST_FILE]
        for name in owned:
            for base in (self.dst, self.state):
                target = base / name
                for stale in target.parent.glob(f"{glob.escape(target.name)}*.partial"):
                    stale.unlink()

    def mark_done(self) -> None:
        n = self.job["num_workers"]
        write_json(self.state / f"share-{self.worker_index}-of-{n}.json", {"shards": self.shard_names})

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def start_share(
    dst: Path, job: dict, worker_index: int, overwrite: bool = False, resume: bool = False
) -> JobShare | None:
    """Take this process's share of ``job`` in ``dst``; None when ``resume`` finds the job already finished.

    Refuses (exit 2) a directory that holds anything but this job, unless ``overwrite`` (only ever of
    a w4a8conv output) or ``resume``; refuses while another process holds the same share.
    """
    state = dst / STATE_DIR
    job_file = state / JOB_FILE
    is_array = job["num_workers"] > 1
    if overwrite and is_array:
        raise BadInputError("--overwrite: not with --num-workers > 1; give the array a fresh directory")
    finished = _finished_description(dst)
    if not state.is_dir():
        if finished is not None:
            if resume and finished == json.loads(json.dumps(job["description"])):
                return None
            if resume and _same_apart_from_checksums(finished, job["description"]):
                flag = _checksums_flag(finished)
                raise BadInputError(f"--out {dst}: this conversion was finished with {flag}; pass it here too")
            if not overwrite:
                raise BadInputError(f"--out {dst}: holds a finished conversion; pass --overwrite to replace it")
        # The last test matters to job arrays: a sibling job may create the state directory between
        # the first test and the listing, and that is no reason to refuse.
        elif dst.exists() and any(dst.iterdir()) and not state.is_dir():
            what = "--overwrite only replaces w4a8conv output" if overwrite else "choose a new one"
            raise BadInputError(f"--out {dst}: exists and is not an empty directory; {what}")
    state.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(state / f"lock-{worker_index}-of-{job['num_workers']}", dst)
    try:
        existing = json.loads(job_file.read_text()) if job_file.is_file() else None
        if overwrite:
            _clear(dst, keep=state / f"lock-{worker_index}-of-{job['num_workers']}")
            existing = None
        elif existing is not None and existing != json.loads(json.dumps(job)):
            if _same_apart_from_checksums(existing, job):
                flag = _checksums_flag(existing["description"])
                raise BadInputError(f"--out {dst}: this conversion was started with {flag}; pass it here too")
            raise BadInputError(f"--out {dst}: holds a different conversion in progress; choose a new directory")
        elif existing is not None and not (resume or is_array):
            raise BadInputError(f"--out {dst}: holds an unfinished conversion; rerun with --resume to finish it")
        if existing is None:
            write_json(job_file, job)
        share = JobShare(dst, job, worker_index, lock_fd)
        share.remove_stale_partials()
    except BaseException:
        os.close(lock_fd)
        raise
    return share


def has_manifest(description: dict) -> bool:
    """Whether the conversion with this description writes the checksum manifest (earlier ones all did)."""
    return description[TOOL_SECTION].get("checksum_manifest", MANIFEST_FILE) is not None


def _checksums_flag(description: dict) -> str:
    return "--checksums" if has_manifest(description) else "--no-checksums"


def _same_apart_from_checksums(ours: dict, theirs: dict) -> bool:
    """Whether two jobs (or two descriptions) are the same as JSON but for ``--checksums/--no-checksums``."""

    def without(data: dict) -> dict:
        data = json.loads(json.dumps(data))
        data.get("description", data).get(TOOL_SECTION, {}).pop("checksum_manifest", None)
        return data

    return without(ours) == without(theirs)


def _finished_description(dst: Path) -> dict | None:
    path = dst / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return description if isinstance(description, dict) and TOOL_SECTION in description else None


def _lock(path: Path, dst: Path) -> int:
    """An exclusive lock the kernel drops when the process dies (kill -9 included)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadInputError(
            f"--out {dst}: another w4a8conv (pid {holder}) is converting into it; wait for it to end"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _clear(dst: Path, keep: Path) -> None:
    """Delete a previous w4a8conv output (for --overwrite), all but our own lock."""
    for child in dst.iterdir():
        if child.name == STATE_DIR:
            for inner in child.iterdir():
                if inner != keep:
                    shutil.rmtree(inner) if inner.is_dir() else inner.unlink()
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def finalize(dst: Path | str) -> dict:
    """Write the manifest (if the job has checksums), the index and then the description once every share is done.

    Refuses, naming them, while shares are missing or still running. Returns the job's summary.
    """
    dst = Path(dst)
    state = dst / STATE_DIR
    job_file = state / JOB_FILE
    if not job_file.is_file():
        if _finished_description(dst) is not None:
            raise BadInputError(f"{dst}: already finalized")
        raise BadInputError(f"{dst}: no conversion in progress here ({STATE_DIR}/{JOB_FILE} is missing)")
    job = json.loads(job_file.read_text())
    n = job["num_workers"]
    missing = [i for i in range(n) if not (state / f"share-{i}-of-{n}.json").is_file()]
    if missing:
        raise W4A8ConvError(
            f"{dst}: shares {', '.join(map(str, missing))} of {n} (--worker-index) are not finished", EXIT_FAILURE
        )
    for name, size in job["shards"].items():
        path = dst / name
        if not path.is_file() or path.stat().st_size != size:
            raise W4A8ConvError(f"{path}: shard missing or incomplete although its share is marked done")
    for rel in job["extra_files"]:
        if not (dst / rel).is_file():
            raise W4A8ConvError(f"{dst / rel}: missing although share 0 is marked done")
    index_bytes = json_bytes(job["index"])
    description_bytes = json_bytes(job["description"])
    if has_manifest(job["description"]):
        sums = {name: _read_checksum(state, dst, name) for name in job["shards"]}
        sums.update({rel: sha256_file(dst / rel) for rel in job["extra_files"]})
        sums[job["index_name"]] = hashlib.sha256(index_bytes).hexdigest()
        sums[DESCRIPTION_FILE] = hashlib.sha256(description_bytes).hexdigest()
        manifest = "".join(
            f"{digest}  {name}\n" for name, digest in sorted(sums.items(), key=lambda kv: natural_key(kv[0]))
        )
        write_atomic(dst / MANIFEST_FILE, manifest.encode())
    write_atomic(dst / job["index_name"], index_bytes)
    write_atomic(dst / DESCRIPTION_FILE, description_bytes)  # last: its presence means complete
    shutil.rmtree(state)
    fsync_dir(dst)
    return job["summary"]


def _read_checksum(state: Path, dst: Path, shard: str) -> str:
    path = state / SUMS_DIR / f"{shard}.sha256"
    return path.read_text().strip() if path.is_file() else sha256_file(dst / shard)


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json_bytes(data))


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a unique temporary name, fsync, rename: complete or absent, safe with concurrent jobs."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_file_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
