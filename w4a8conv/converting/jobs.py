"""The output directory as a job: its plan on disk, shares, lock, resume, checksums and finalize.

A conversion writes its plan to ``DST/.w4a8conv/job.json`` (everything :func:`finalize` needs)
before any shard; a resumed conversion, or another job of an array, must plan the same conversion
(equal fingerprints).
Shards are written as ``<name>.partial``, fsynced and renamed, so a shard under its final name is
complete; a killed or failed conversion resumes by redoing only the shards that are not. The
checksum manifest, the index and, last of all, the description are written by :func:`finalize`:
a directory without the description is visibly unfinished. Nothing here knows about int4.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shlex
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EXIT_FAILURE, BadInputError, W4A8ConvError, describe_os_error
from ..formats.canary import canary_chunks, canary_path, canary_sources, with_digest, without_digest
from ..formats.targets import DEFAULT_TARGET
from ..names import (
    CANARY_FILE,
    CONFIG_FILE,
    DESCRIPTION_FILE,
    JOB_FILE,
    MANIFEST_FILE,
    STATE_DIR,
    TOOL_SECTION,
    natural_key,
)
from ..planning.plan import ConversionPlan
from ..reading.job_file import fingerprint_of, resume_command, saved_choices
from ..safetensors_io import sha256_file

# Every writer locks it: the jobs of an array shared, a single conversion, --overwrite and finalize
# exclusively, so that none of those runs beside another.
DIRECTORY_LOCK = "lock"
# Held exclusively, blocking, only while a job file is checked or created: exactly one plan is ever
# created in a directory, and every other job compares fingerprints with it before writing anything.
PLAN_LOCK = "plan-lock"
SUMS_DIR = "sums"
# A failed ``finalize --verify`` leaves this in the state directory (and no description): a plain
# finalize refuses to publish while it is there.
VERIFY_FAILED = "verify-failed.json"


class VerificationFailed(W4A8ConvError):
    """``finalize --verify`` found the output differs from its source: nothing was published."""

    def __init__(self, dst: Path, plan: ConversionPlan, report: Any):
        self.report = report
        first = report.problems[0] if report.problems else "no problem named"
        super().__init__(
            f"{dst}: not finalized, the verification failed ({len(report.problems)} problems; first: {first}); "
            f"{_after_a_failed_verification(dst, plan)}",
            EXIT_FAILURE,
        )


def _after_a_failed_verification(dst: Path, plan: ConversionPlan) -> str:
    """What to do once ``--verify`` found an output that differs from its source: the output stays unfinished."""
    if plan.array_size == 1:
        redo = f"`w4a8conv convert --in {plan.source} --out {dst} --resume --verify` redoes them and checks again"
    else:
        redo = (
            f"rerun the array tasks that wrote them (--array-index), then "
            f"`w4a8conv finalize {shlex.quote(str(dst))} --verify {shlex.quote(str(plan.source))}`"
        )
    return f"it stays unfinished: delete the files named; {redo}; or convert again into a new directory"


@dataclass(frozen=True)
class Choices:
    """What a conversion is asked to make, as the command line says it: None where it says nothing, so
    that a resumed conversion (or a later job of an array) takes what the conversion was started with."""

    target: str | None = None
    dtype: str | None = None  # None: config.json's
    checksums: bool | None = None
    force_dtype: bool = False  # --dtype may contradict config.json's

    def with_defaults(self) -> Choices:
        checksums = True if self.checksums is None else self.checksums
        return Choices(self.target or DEFAULT_TARGET, self.dtype, checksums, self.force_dtype)


def continued_choices(dst: Path, src: Path, given: Choices, resume: bool, array_size: int) -> Choices:
    """The choices of the conversion this run continues in ``dst`` (with ``resume``, or as a job of an
    array), or ``given`` with the defaults where it continues none.

    What the command line gives must agree with what the conversion was started with: a contradiction is
    refused in one line naming the option and both values, before anything is planned.
    """
    if not (resume or array_size > 1):
        return given.with_defaults()
    saved = _started_with(dst, src)
    if saved is None:
        return given.with_defaults()
    target, dtype, checksums = saved
    for option, mine, theirs in (
        ("--target", given.target, target),
        ("--dtype", given.dtype, dtype),
        ("--checksums", given.checksums, checksums),
    ):
        if mine is not None and mine != theirs:
            started = _checksums_flag(theirs) if option == "--checksums" else f"{option} {theirs}"
            passed = _checksums_flag(mine) if option == "--checksums" else f"{option} {mine}"
            raise BadInputError(
                f"--out {dst}: this conversion was started with {started}, not {passed}; "
                f"drop {'--checksums/--no-checksums' if option == '--checksums' else option} or pass the same"
            )
    # the dtype it was started with was accepted then, against config.json or not
    return Choices(target, dtype, checksums, force_dtype=True)


def _started_with(dst: Path, src: Path) -> tuple[str, str, bool] | None:
    """(target, dtype, checksums) of the conversion of ``src`` in ``dst``: an unfinished one's saved plan,
    or a finished one's description; None where ``dst`` holds neither (or another source's)."""
    job_file = dst / STATE_DIR / JOB_FILE
    if job_file.is_file():
        saved = saved_choices(job_file)
        if saved is None or Path(saved["source"]) != src.resolve():
            return None
        return saved["target"], saved["params_dtype"], saved["checksums"]
    finished = _finished_description(dst)
    section = finished.get(TOOL_SECTION) if isinstance(finished, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("target"), str):
        return None
    return section["target"], section.get("params_dtype"), section.get("checksum_manifest") is not None


class JobShare:
    """This process's share of a job in an output directory, held under a lock until closed."""

    def __init__(self, dst: Path, plan: ConversionPlan, array_index: int, lock_fds: tuple[int, ...]):
        self.dst = dst
        self.plan = plan
        self.array_index = array_index
        self._lock_fds = lock_fds
        self.state = dst / STATE_DIR

    @property
    def shard_names(self) -> tuple[str, ...]:
        return self.plan.shares[self.array_index]

    @property
    def checksums(self) -> bool:
        return self.plan.checksums

    def is_complete(self, shard: str) -> bool:
        """A shard under its final name and size was fsynced before its rename: it is complete."""
        path = self.dst / shard
        return path.is_file() and path.stat().st_size == self.plan.shard(shard).file_size

    def has_checksum(self, shard: str) -> bool:
        return (self.state / SUMS_DIR / f"{shard}.sha256").is_file()

    def record_checksum(self, shard: str) -> None:
        """Hash a shard an earlier run finished without saving its hash, for the manifest."""
        self.save_checksum(shard, sha256_file(self.dst / shard))

    def save_checksum(self, shard: str, digest: str) -> None:
        real_directory(self.state / SUMS_DIR, self.dst)
        write_atomic(self.state / SUMS_DIR / f"{shard}.sha256", f"{digest}\n".encode())

    def remove_stale_partials(self) -> None:
        """Delete temporary files a killed run of this share left (never another share's)."""
        owned = [*self.shard_names, *(f"{SUMS_DIR}/{name}.sha256" for name in self.shard_names)]
        owned.append(_share_file(self.array_index, self.plan.array_size))
        if self.array_index == 0:
            # Not the job file's: every job of an array writes it, and one starting beside this one may
            # be writing it right now. Leftovers of a killed run go when finalize removes the state.
            owned += [*self.plan.extra_files, self.plan.index_name, DESCRIPTION_FILE, MANIFEST_FILE, CONFIG_FILE]
            owned.append(CANARY_FILE)
        for name in owned:
            for base in (self.dst, self.state):
                target = base / name
                for stale in target.parent.glob(f"{glob.escape(target.name)}*.partial"):
                    stale.unlink()

    def mark_done(self) -> None:
        write_json(self.state / _share_file(self.array_index, self.plan.array_size), {"shards": self.shard_names})

    def close(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = ()


def start_share(
    dst: Path, plan: ConversionPlan, array_index: int, overwrite: bool = False, resume: bool = False
) -> JobShare | None:
    """Take this process's share of ``plan`` in ``dst``; None when ``resume`` finds the job already finished.

    Refuses (exit 2) a directory that holds anything but this conversion, unless ``overwrite`` (only
    ever of a w4a8conv output) or ``resume``; refuses while another process holds the same share.
    """
    state = dst / STATE_DIR
    job_file = state / JOB_FILE
    is_array = plan.array_size > 1
    lock_name = f"lock-{array_index}-of-{plan.array_size}"
    if _check_directory(dst, plan, overwrite, resume):
        return None
    with _unusable_out(dst):
        dst.mkdir(parents=True, exist_ok=True)
        real_directory(state, dst)
        locks = [_lock(state / DIRECTORY_LOCK, dst, shared=is_array)]
    try:
        locks.append(_lock(state / lock_name, dst))
        with _plan_lock(state / PLAN_LOCK):
            existing = _check_job_file(dst, plan, resume) if job_file.is_file() and not overwrite else None
            if overwrite:
                _clear(dst, keep={state / lock_name, state / DIRECTORY_LOCK, state / PLAN_LOCK})
            if existing is None:
                write_atomic(job_file, plan.to_bytes())
        share = JobShare(dst, plan, array_index, tuple(locks))
        share.remove_stale_partials()
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise
    return share


def check_output(dst: Path, plan: ConversionPlan, overwrite: bool = False, resume: bool = False) -> bool:
    """What :func:`start_share` refuses, checked without writing or locking (``--dry-run``), and whether
    the output can be written at all; True when ``resume`` would find the job finished."""
    if _check_directory(dst, plan, overwrite, resume):
        return True
    if (dst / STATE_DIR / JOB_FILE).is_file() and not overwrite:
        _check_job_file(dst, plan, resume)
    with _unusable_out(dst):
        _check_writable(dst / STATE_DIR if dst.exists() else dst)
    return False


@contextlib.contextmanager
def _unusable_out(dst: Path) -> Iterator[None]:
    """An --out that cannot be created or written (a read-only filesystem, no permission) is bad input,
    found before anything is written (exit 2), in the real run and the dry run alike."""
    try:
        yield
    except OSError as e:
        raise BadInputError(f"--out {dst}: cannot be written: {describe_os_error(e)}") from None


def _check_directory(dst: Path, plan: ConversionPlan, overwrite: bool, resume: bool) -> bool:
    """Refuse an ``--out`` that is not this conversion's to write; True when ``resume`` finds it finished."""
    state = dst / STATE_DIR
    if overwrite and plan.array_size > 1:
        raise BadInputError("--overwrite: not with --array-size > 1; give the array a fresh directory")
    _refuse_link(state)
    finished = _finished_description(dst)
    if not state.is_dir():
        if finished is not None:
            if resume and finished == _as_json(plan.description):
                return True
            if resume and finished == _as_json(plan.with_checksums(not plan.checksums).description):
                flag = _checksums_flag(not plan.checksums)
                raise BadInputError(f"--out {dst}: this conversion was finished with {flag}; pass it here too")
            if not overwrite:
                raise BadInputError(f"--out {dst}: holds a finished conversion; pass --overwrite to replace it")
        # The last test matters to job arrays: a sibling job may create the state directory between
        # the first test and the listing, and that is no reason to refuse.
        elif dst.exists() and any(dst.iterdir()) and not state.is_dir():
            what = "--overwrite only replaces w4a8conv output" if overwrite else "choose a new one"
            raise BadInputError(f"--out {dst}: exists and is not an empty directory; {what}")
    return False


def _check_job_file(dst: Path, plan: ConversionPlan, resume: bool) -> str:
    """Refuse a conversion in progress in ``dst`` that is not this one; returns its fingerprint."""
    job_file = dst / STATE_DIR / JOB_FILE
    existing = _saved_fingerprint(job_file)
    array = plan.array_size > 1
    if existing != plan.fingerprint:
        saved = read_plan(job_file)  # only here: tens of MB for DeepSeek-R1
        changed = _changed_input(saved, plan)
        if changed is not None:
            raise BadInputError(
                f"{plan.source / changed}: changed since the conversion into --out {dst} started "
                "(size, time, inode or header); its shards so far hold the old data: convert again into "
                f"a new directory{'' if array else ', or with --overwrite'}"
            )
        if saved.source == plan.source:  # the same input, other choices: never advise throwing the work away
            started = _differing_choice(saved, plan)
            if array:
                raise BadInputError(
                    f"--out {dst}: this job array was started with {started}; pass the same to every job"
                )
            raise BadInputError(
                f"--out {dst}: holds an unfinished conversion of this input started with {started}; finish it "
                f"with `{resume_command(dst, plan.source)}` (it keeps the choices it was started with), or "
                "convert into a new directory"
            )
        other = "" if array else ", or pass --overwrite to replace it"
        raise BadInputError(
            f"--out {dst}: holds a conversion in progress of another input ({saved.source}); "
            f"choose a new directory{other}"
        )
    if not (resume or array):
        raise BadInputError(
            f"--out {dst}: holds an unfinished conversion of this input; finish it with "
            f"`{resume_command(dst, plan.source)}`"
        )
    return existing


def _differing_choice(saved: ConversionPlan, plan: ConversionPlan) -> str:
    """The first choice a saved plan was made with that differs from ``plan``'s, as its option says it."""
    if saved.array_size != plan.array_size:
        return f"--array-size {saved.array_size}" if saved.array_size > 1 else "no --array-size"
    for option, theirs, mine in (
        ("--target", saved.target, plan.target),
        ("--dtype", saved.params_dtype, plan.params_dtype),
    ):
        if theirs != mine:
            return f"{option} {theirs}"
    if saved.checksums != plan.checksums:
        return _checksums_flag(saved.checksums)
    return f"w4a8conv {saved.tool_version}, whose plan differs from this version's"


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def written_in_full(path: Path, size: int) -> bool:
    """Whether an output file is there at its planned size."""
    return path.is_file() and path.stat().st_size == size


def _check_writable(path: Path) -> None:
    """Raise the error creating ``path`` would raise where its nearest existing directory is read-only."""
    parent = nearest_existing(path)
    if os.access(parent, os.W_OK | os.X_OK):
        return
    first = parent / path.relative_to(parent).parts[0] if path != parent else path  # what mkdir would name
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    code = errno.EROFS if read_only else errno.EACCES
    raise OSError(code, os.strerror(code), str(first))


def read_plan(path: Path) -> ConversionPlan:
    """The plan a conversion saved in its state directory; a bad file is one line naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the conversion plan ({e.strerror})") from None
    return ConversionPlan.from_bytes(raw, str(path))


def _saved_fingerprint(path: Path) -> str:
    """The fingerprint of a saved plan, read from the start of its file without parsing the plan."""
    with open(path, "rb") as f:
        head = f.read(256)
    fingerprint = fingerprint_of(head)
    if fingerprint is None:
        # Before the plan had a fingerprint (w4a8conv 0.1.0 up to 2026-11-28) job.json was plain JSON.
        raise BadInputError(
            f"{path}: not a conversion plan of this w4a8conv (an earlier version's, or damaged); "
            "finish that conversion with the version that started it, or choose a new --out (or pass --overwrite)"
        )
    return fingerprint


def _changed_input(saved: ConversionPlan, plan: ConversionPlan) -> str | None:
    """The first input file whose identity differs between a saved plan and a new one of the same source."""
    if saved.source != plan.source:
        return None
    names = sorted(set(saved.inputs) | set(plan.inputs))
    return next((name for name in names if saved.inputs.get(name) != plan.inputs.get(name)), None)


def has_manifest(description: dict) -> bool:
    """Whether the conversion with this description writes the checksum manifest (earlier ones all did)."""
    return description[TOOL_SECTION].get("checksum_manifest", MANIFEST_FILE) is not None


def _checksums_flag(checksums: bool) -> str:
    return "--checksums" if checksums else "--no-checksums"


def _as_json(data) -> object:
    """``data`` as it reads back from JSON (tuples become lists), for comparing with a file."""
    return json.loads(json.dumps(data))


def _share_file(array_index: int, array_size: int) -> str:
    return f"share-{array_index}-of-{array_size}.json"


def _finished_description(dst: Path) -> dict | None:
    path = dst / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(description, dict) or TOOL_SECTION not in description:
        return None
    return without_digest(description, TOOL_SECTION)  # as planned, to compare with a plan


def _lock(path: Path, dst: Path, shared: bool = False) -> int:
    """A lock the kernel drops when the process dies (kill -9 included): exclusive, or ``shared`` with
    other shared holders (the jobs of an array). An exclusive holder writes its pid into the file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if holder:
            raise BadInputError(
                f"--out {dst}: another w4a8conv (pid {holder}) is converting into it; wait for it to end"
            ) from None
        raise BadInputError(f"--out {dst}: the jobs of an array are converting into it; wait for them to end") from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def _plan_lock(path: Path) -> Iterator[None]:
    """Exclusive, waiting for the holder (another job of an array checking or creating the plan: moments)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clear(dst: Path, keep: set[Path]) -> None:
    """Delete a previous w4a8conv output (for --overwrite), all but our own locks."""
    for child in dst.iterdir():
        if child.name == STATE_DIR:
            for inner in child.iterdir():
                if inner not in keep:
                    shutil.rmtree(inner) if inner.is_dir() and not inner.is_symlink() else inner.unlink()
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def finalize(
    dst: Path | str, plan: ConversionPlan | None = None, verify: Callable[[Path], Any] | None = None
) -> ConversionPlan | None:
    """Write the manifest (if the job has checksums), the index and then the description once every share is done.

    Refuses, naming them, while shares are missing or still running. ``plan``: the job's plan, when
    the caller holds it and the directory's lock (a single-process conversion); else the lock is
    taken here and the plan read from the job file. ``verify``: called with the description's path
    before it is published (it is still in the state directory); a report that is not ``ok`` raises
    :class:`VerificationFailed` and publishes nothing. Returns the plan, or None for a directory
    already finalized (a retried step: nothing to do).
    """
    dst = Path(dst)
    state = dst / STATE_DIR
    job_file = state / JOB_FILE
    _refuse_link(state)
    if not job_file.is_file():
        if _finished_description(dst) is not None:
            return None
        raise BadInputError(f"{dst}: no conversion in progress here ({STATE_DIR}/{JOB_FILE} is missing)")
    if plan is not None:
        return _finalize_locked(dst, plan, verify)
    lock = _lock(state / DIRECTORY_LOCK, dst)
    try:
        return _finalize_locked(dst, read_plan(job_file), verify)
    finally:
        os.close(lock)


def _finalize_locked(dst: Path, plan: ConversionPlan, verify: Callable[[Path], Any] | None) -> ConversionPlan:
    state = dst / STATE_DIR
    failed = state / VERIFY_FAILED
    if verify is None and failed.is_file():
        raise W4A8ConvError(
            f"{dst}: `finalize --verify` found it differs from its source ({_first_problem(failed)}); "
            f"{_after_a_failed_verification(dst, plan)}",
            EXIT_FAILURE,
        )
    n = plan.array_size
    missing = [i for i in range(n) if not (state / _share_file(i, n)).is_file()]
    if missing and n == 1:
        raise W4A8ConvError(
            f"{dst}: this conversion was interrupted before all its shards were written; finish it with "
            f"`{resume_command(dst, plan.source)}` (which finalizes it)",
            EXIT_FAILURE,
        )
    if missing:
        raise W4A8ConvError(
            f"{dst}: shares {', '.join(map(str, missing))} of {n} (--array-index) are not finished", EXIT_FAILURE
        )
    for shard in plan.shards:
        path = dst / shard.name
        if not written_in_full(path, shard.file_size):
            raise W4A8ConvError(f"{path}: shard missing or incomplete although its share is marked done")
    for rel in plan.extra_files:
        if not (dst / rel).is_file():
            raise W4A8ConvError(f"{dst / rel}: missing although share 0 is marked done")
    description = dict(plan.description)
    canary = plan.description.get(TOOL_SECTION, {}).get("canary")
    if canary is not None:
        path = canary_path(dst, canary)
        if not path.is_file() or path.is_symlink():
            raise W4A8ConvError(f"{path}: missing although share 0 is marked done")
        description = with_digest(description, TOOL_SECTION, sha256_file(path))
    index_bytes = json_bytes(plan.index)
    description_bytes = json_bytes(description)
    written = {} if plan.served_config is None else {CONFIG_FILE: json_bytes(dict(plan.served_config))}
    if plan.checksums:
        sums = {shard.name: _read_checksum(state, dst, shard.name) for shard in plan.shards}
        sums.update({rel: sha256_file(dst / rel) for rel in plan.extra_files})
        if canary is not None:
            sums[canary["file"]] = description[TOOL_SECTION]["canary"]["sha256"]
        sums.update({name: hashlib.sha256(data).hexdigest() for name, data in written.items()})
        sums[plan.index_name] = hashlib.sha256(index_bytes).hexdigest()
        sums[DESCRIPTION_FILE] = hashlib.sha256(description_bytes).hexdigest()
        manifest = "".join(
            f"{digest}  {name}\n" for name, digest in sorted(sums.items(), key=lambda kv: natural_key(kv[0]))
        )
        write_atomic(dst / MANIFEST_FILE, manifest.encode())
    for name, data in written.items():
        write_atomic(dst / name, data)
    write_atomic(dst / plan.index_name, index_bytes)
    if verify is not None:  # the description waits in the state directory until the output is verified
        write_atomic(state / DESCRIPTION_FILE, description_bytes)
        report = verify(state / DESCRIPTION_FILE)
        if not report.ok:
            write_json(failed, {"problems": list(report.problems[:20]), "count": len(report.problems)})
            raise VerificationFailed(dst, plan, report)
        os.replace(state / DESCRIPTION_FILE, dst / DESCRIPTION_FILE)
    else:
        write_atomic(dst / DESCRIPTION_FILE, description_bytes)  # last: its presence means complete
    shutil.rmtree(state)
    fsync_dir(dst)
    return plan


def _first_problem(path: Path) -> str:
    try:
        problems = json.loads(path.read_text())["problems"]
        return str(problems[0]) if problems else "no problem named"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} names them"


def _read_checksum(state: Path, dst: Path, shard: str) -> str:
    """A shard's saved sha256, or the shard hashed again where none was saved or the saved one is damaged."""
    path = state / SUMS_DIR / f"{shard}.sha256"
    try:
        saved = path.read_text().strip() if path.is_file() and not path.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        saved = ""
    is_digest = len(saved) == 64 and all(c in "0123456789abcdef" for c in saved)
    return saved if is_digest else sha256_file(dst / shard)


def write_canary(plan: ConversionPlan, dst: Path) -> None:
    """Write the canary the plan records (share 0 does, beside the copied files), atomically."""
    spec = plan.description.get(TOOL_SECTION, {}).get("canary")
    if spec is not None:
        write_atomic(canary_path(dst, spec), canary_chunks(canary_sources(plan.modules, spec)))


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json_bytes(data))


def real_directory(path: Path, top: Path) -> None:
    """Make ``path`` (inside ``top``) a directory, refusing any link on the way: nothing under --out is followed."""
    current = top
    for part in path.relative_to(top).parts:
        current = current / part
        _refuse_link(current)
        if not current.exists():
            current.mkdir(exist_ok=True)
        elif not current.is_dir():
            raise BadInputError(f"{current}: is not a directory, but the conversion needs one there")


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise BadInputError(f"{path}: is a link; w4a8conv follows no link inside --out: remove it")


def _create_new(path: Path):
    """A new file at ``path``, never through a link (an old temporary file there goes first)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # removes a link itself, never its target
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or its pieces in order) under a unique temporary name, fsync, rename:
    complete or absent, safe with concurrent jobs."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with _create_new(tmp) as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target


def copy_file_atomic(src: Path, top: Path, rel: Path) -> None:
    """Copy ``src`` to ``top / rel`` as :func:`write_atomic` writes, following no link under ``top``."""
    dst = top / rel
    real_directory(dst.parent, top)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    with open(src, "rb") as source, _create_new(tmp) as target:
        shutil.copyfileobj(source, target, 16 << 20)
        target.flush()
        os.fsync(target.fileno())
    os.replace(tmp, dst)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
