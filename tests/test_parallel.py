"""Threads inside a process and job arrays across processes give byte-identical output."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.converting.jobs import finalize
from w4a8conv.names import DESCRIPTION_FILE, MANIFEST_FILE, STATE_DIR
from w4a8conv.planning.planner import assign_shares, build_plan
from w4a8conv.reading.checkpoint import open_checkpoint
from w4a8conv.reading.read_ahead import ReadAhead
from w4a8conv.safetensors_io import STAGING, TensorInfo, staging, writer
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET

runner = CliRunner()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """A checkpoint with more shards than the tests' workers, so shares are non-trivial."""
    return write_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", "mindie", SyntheticSpec(shards=7, moe_layers=3))


@pytest.fixture(scope="module")
def single_run(many_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    convert_checkpoint(many_shards, out, workers=1, target=LEGACY_TARGET)
    return out


@pytest.mark.parametrize("workers", [2, 5])
def test_workers_give_identical_bytes(many_shards, single_run, tmp_path, workers):
    convert_checkpoint(many_shards, tmp_path / "out", workers=workers, target=LEGACY_TARGET)
    assert tree_bytes(tmp_path / "out") == tree_bytes(single_run)


@pytest.mark.parametrize("workers", [1, 4])
def test_direct_writes_give_the_same_bytes_as_the_page_cache(
    many_shards, tmp_path, monkeypatch, direct_io_calls, workers
):
    # The synthetic tensors are small: lower the threshold so that most of them, and pieces of the
    # pass-through copies, go direct (including out-of-order ones held for the hash, and fallbacks
    # past a low retention limit); then the same conversion with --no-direct-io.
    monkeypatch.setattr(staging, "DIRECT_MIN_BYTES", 4096)
    monkeypatch.setattr(writer, "STAGED_COPY_BYTES", 8192)
    monkeypatch.setattr(writer, "RETAINED_BYTES", 64 * 1024)
    hinted: list[TensorInfo] = []
    monkeypatch.setattr("w4a8conv.reading.read_ahead.prefetch", hinted.extend)

    def direct(kind: str) -> list[tuple[str, int, int]]:
        return [(path, offset, length) for k, path, offset, length in direct_io_calls if k == kind]

    args = ["convert", "--in", str(many_shards), "--workers", str(workers), "--target", LEGACY_TARGET]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "direct"), "--direct-io"]).exit_code == 0
    if not direct("write"):
        pytest.skip("this filesystem takes no O_DIRECT")
    assert len(direct("write")) > 50 and len(direct("read")) > 50
    # Sources are read direct too (weights of 4 KiB or more here); those are never hinted to the page cache.
    assert hinted
    read_direct = set(direct("read"))
    for info in hinted:  # a direct read takes the whole blocks around its tensor
        first = info.begin - info.begin % 4096
        blocks = (os.path.realpath(info.path), first, -(-(info.end - first) // 4096) * 4096)
        assert blocks not in read_direct, info.name
    direct_io_calls.clear()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "buffered"), "--no-direct-io"]).exit_code == 0
    assert not direct_io_calls
    assert tree_bytes(tmp_path / "direct") == tree_bytes(tmp_path / "buffered")
    # On a filesystem not known to stream direct writes well, the page cache is the default ...
    monkeypatch.setattr("w4a8conv.reading.filesystems.filesystem_type", lambda path: "nfs4")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "nfs-default"), "--json"])
    assert result.exit_code == 0 and not direct_io_calls
    summary = json.loads(result.stdout)
    assert summary["direct_io"] is False and summary["direct_reads"] is False
    # ... and --direct-io asks for it anyway.
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "nfs-direct"), "--direct-io"]).exit_code == 0
    assert direct("write")
    direct_tree = tree_bytes(tmp_path / "direct")
    assert tree_bytes(tmp_path / "nfs-default") == direct_tree and tree_bytes(tmp_path / "nfs-direct") == direct_tree


def _split_manifest(root: Path) -> tuple[dict[str, bytes], dict, str | None, bytes | None]:
    """The other files, the description less the manifest's name, that name, and the manifest."""
    files = tree_bytes(root)
    manifest = files.pop(MANIFEST_FILE, None)
    description = json.loads(files.pop(DESCRIPTION_FILE))
    return files, description, description["w4a8conv"].pop("checksum_manifest"), manifest


def test_no_checksums_gives_the_same_shards_and_no_manifest(many_shards, single_run, tmp_path, monkeypatch):
    # Direct writes of small pieces, so staged buffers, with no hash to wait for, go back to the pool.
    monkeypatch.setattr(staging, "DIRECT_MIN_BYTES", 4096)
    monkeypatch.setattr(writer, "STAGED_COPY_BYTES", 8192)
    released = []
    real_give = STAGING.give
    monkeypatch.setattr(STAGING, "give", lambda buffer: released.append(1) or real_give(buffer))
    result = convert_checkpoint(many_shards, tmp_path / "out", workers=3, checksums=False, target=LEGACY_TARGET)
    assert result.checksums is False
    files, description, named, manifest = _split_manifest(tmp_path / "out")
    assert named is None and manifest is None
    files_hashed, description_hashed, named_hashed, manifest_hashed = _split_manifest(single_run)
    assert named_hashed == MANIFEST_FILE and manifest_hashed
    assert files == files_hashed and description == description_hashed  # shards and index too
    if released:  # this filesystem takes O_DIRECT
        assert len(released) > 50
    report = verify_conversion(many_shards, tmp_path / "out")
    assert report.ok and report.manifest is False and report.files_hashed == 0


def test_array_jobs_take_the_choices_the_array_was_started_with(many_shards, tmp_path):
    """A later job that says nothing takes --no-checksums from the plan; one that contradicts it is refused
    in one line naming both values."""
    out = tmp_path / "out"
    no_sums = ["--no-checksums"]
    assert convert_share(many_shards, out, 2, 0, *no_sums).exit_code == 0
    result = convert_share(many_shards, out, 2, 1, "--checksums")
    assert result.exit_code == 2
    assert "this conversion was started with --no-checksums, not --checksums; drop --checksums/--no-checksums or " in (
        result.stderr
    )
    assert convert_share(many_shards, out, 2, 1).exit_code == 0
    assert runner.invoke(app, ["finalize", str(out)]).exit_code == 0
    convert_checkpoint(many_shards, tmp_path / "single", checksums=False, target=LEGACY_TARGET)
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")
    assert not (out / MANIFEST_FILE).exists()


def test_conversion_is_deterministic(many_shards, single_run, tmp_path):
    convert_checkpoint(many_shards, tmp_path / "again", workers=1, target=LEGACY_TARGET)
    assert tree_bytes(tmp_path / "again") == tree_bytes(single_run)


def test_shares_are_disjoint_complete_and_deterministic(many_shards):
    shards = build_plan(open_checkpoint(many_shards)).shards
    for n in (1, 2, 3, 7, 9):
        shares = assign_shares(shards, n)
        names = [name for share in shares for name in share]
        assert sorted(names) == sorted(s.name for s in shards) and len(names) == len(set(names))
        assert shares == assign_shares(tuple(reversed(shards)), n)  # same split whatever the order


def test_job_array_then_finalize_equals_single_run(many_shards, single_run, tmp_path):
    out = tmp_path / "out"
    # Each job of the array is an independent process, as in a Slurm array or a Kubernetes Indexed Job.
    for index in (2, 0, 1):
        cmd = [sys.executable, "-m", "w4a8conv.cli", "convert", "--in", str(many_shards), "--out", str(out)]
        cmd += ["--target", LEGACY_TARGET]
        cmd += ["--array-size", "3", "--array-index", str(index)]
        subprocess.run(cmd, check=True, capture_output=True)
        assert not (out / "quant_model_description.json").exists()  # not complete before finalize
    result = runner.invoke(app, ["finalize", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    assert tree_bytes(out) == tree_bytes(single_run)
    assert not (out / STATE_DIR).exists()


def convert_share(src: Path, out: Path, array_size: int, index: int, *more: str):
    args = ["--array-size", str(array_size), "--array-index", str(index), *more]
    return runner.invoke(app, ["convert", "--in", str(src), "--out", str(out), "--target", LEGACY_TARGET, *args])


def test_array_jobs_starting_together_do_not_refuse_each_other(many_shards, single_run, tmp_path, monkeypatch):
    # Job 1 finds no state directory, then job 0 creates it just before job 1 lists the output
    # directory: job 1 must not take that for someone else's files.
    out = tmp_path / "out"
    out.mkdir()
    listing = Path.iterdir

    def sibling_starts_first(path):
        if path == out:
            (out / STATE_DIR).mkdir(exist_ok=True)
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", sibling_starts_first)
    convert_checkpoint(many_shards, out, workers=2, array_size=2, array_index=1, target=LEGACY_TARGET)
    monkeypatch.undo()
    convert_checkpoint(many_shards, out, workers=2, array_size=2, array_index=0, target=LEGACY_TARGET)
    assert runner.invoke(app, ["finalize", str(out)]).exit_code == 0
    assert tree_bytes(out) == tree_bytes(single_run)


def test_job_zero_leaves_a_siblings_job_file_being_written_alone(many_shards, single_run, tmp_path):
    # Job 1 is between writing its temporary job file and renaming it when job 0 starts and clears
    # what a killed run of job 0 left behind; job 1's file must survive.
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    sibling = out / STATE_DIR / "job.json.4242.1.partial"
    sibling.write_text("{}")
    convert_checkpoint(many_shards, out, workers=2, array_size=2, array_index=0, target=LEGACY_TARGET)
    assert sibling.read_text() == "{}"
    sibling.unlink()  # job 1 renames it
    convert_checkpoint(many_shards, out, workers=2, array_size=2, array_index=1, target=LEGACY_TARGET)
    assert runner.invoke(app, ["finalize", str(out)]).exit_code == 0
    assert tree_bytes(out) == tree_bytes(single_run)


def test_finalize_names_missing_shares(many_shards, tmp_path):
    out = tmp_path / "out"
    for index in (0, 2):
        result = convert_share(many_shards, out, 4, index)
        assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["finalize", str(out)])
    assert result.exit_code == 1
    assert "shares 1, 3 of 4 (--array-index) are not finished" in result.stderr
    assert not (out / "quant_model_description.json").exists()


def test_finalize_refuses_a_directory_with_no_job(tmp_path):
    result = runner.invoke(app, ["finalize", str(tmp_path)])
    assert result.exit_code == 2 and "no conversion in progress" in result.stderr


def test_array_jobs_refuse_a_different_conversion(many_shards, tmp_path):
    other = write_checkpoint(tmp_path / "other", "v1.0.0-per-group")
    out = tmp_path / "out"
    assert convert_share(many_shards, out, 2, 0).exit_code == 0
    result = convert_share(other, out, 2, 0)
    assert result.exit_code == 2 and "holds a conversion in progress of another input" in result.stderr


def test_bad_array_index(many_shards, tmp_path):
    result = convert_share(many_shards, tmp_path / "o", 2, 2)
    assert result.exit_code == 2 and "--array-index 2" in result.stderr


def _units(sizes: list[int]) -> list[list[TensorInfo]]:
    return [[TensorInfo(f"t{i}", Path(f"f{i}"), "U8", (n,), 0, n)] for i, n in enumerate(sizes)]


def test_read_ahead_hints_each_later_unit_once_and_stays_within_its_window(monkeypatch):
    hinted: list[str] = []
    monkeypatch.setattr("w4a8conv.reading.read_ahead.prefetch", lambda infos: hinted.extend(i.name for i in infos))
    read_ahead = ReadAhead(_units([10] * 20), window=30)
    ran = []
    read_ahead.around(0, ran.append, 0)
    assert hinted == ["t1", "t2", "t3"]  # 30 bytes past unit 0
    read_ahead.around(2, ran.append, 2)  # units start out of order under several workers
    assert hinted == ["t1", "t2", "t3", "t4", "t5"]
    read_ahead.around(1, ran.append, 1)  # an earlier unit hints nothing new
    assert hinted == ["t1", "t2", "t3", "t4", "t5"]
    read_ahead.around(9, ran.append, 9)  # past everything hinted: what it skipped is read by its own worker
    assert hinted[5:] == ["t10", "t11", "t12"]
    for i in range(10, 20):
        read_ahead.around(i, ran.append, i)
    assert ran == [0, 2, 1, 9, *range(10, 20)]
    assert len(hinted) == len(set(hinted)) and hinted[-1] == "t19"


def test_read_ahead_hints_a_unit_larger_than_its_window(monkeypatch):
    hinted: list[str] = []
    monkeypatch.setattr("w4a8conv.reading.read_ahead.prefetch", lambda infos: hinted.extend(i.name for i in infos))
    read_ahead = ReadAhead(_units([1, 500, 1, 1]), window=30)
    read_ahead.around(0, lambda: None)
    assert hinted == ["t1"]
    read_ahead.around(1, lambda: None)
    assert hinted == ["t1", "t2", "t3"]


@pytest.mark.parametrize("pause", ["checked", "locked", "planning", "writing"])
def test_two_arrays_into_one_directory_never_mix(many_shards, single_run, tmp_path, monkeypatch, pause):
    """Two arrays on different inputs sent into the same new --out (a copy-paste slip): one task of A is
    paused at each step between checking the directory and writing its plan while a task of B runs.
    Exactly one plan is ever created; the other array's task is refused before it writes anything, and
    what is left converts and verifies as the winner's single run."""
    from w4a8conv.converting import jobs
    from w4a8conv.errors import BadInputError

    other = write_checkpoint(tmp_path / "other", "v1.0.0-per-group", SyntheticSpec(shards=5, seed=3))
    out = tmp_path / "out"
    reached, release = threading.Event(), threading.Event()

    def hold(step: str) -> None:
        if threading.current_thread().name == "A" and step == pause:
            reached.set()
            assert release.wait(30)

    check_directory, plan_lock, write_atomic = jobs._check_directory, jobs._plan_lock, jobs.write_atomic

    def checked(*args, **kwargs):
        result = check_directory(*args, **kwargs)
        hold("checked")
        return result

    @contextlib.contextmanager
    def locked(path):
        hold("locked")
        with plan_lock(path):
            hold("planning")
            yield

    def writing(path, data):
        if path.name == jobs.JOB_FILE:
            hold("writing")
        write_atomic(path, data)

    monkeypatch.setattr(jobs, "_check_directory", checked)
    monkeypatch.setattr(jobs, "_plan_lock", locked)
    monkeypatch.setattr(jobs, "write_atomic", writing)
    outcome: dict[str, str] = {}

    def task(name: str, src: Path, index: int) -> None:
        try:
            convert_checkpoint(src, out, array_size=2, array_index=index, target=LEGACY_TARGET)
            outcome[name] = "converted"
        except BadInputError as e:
            outcome[name] = str(e)

    a = threading.Thread(target=task, args=("A", many_shards, 0), name="A")
    b = threading.Thread(target=task, args=("B", other, 1), name="B")
    a.start()
    assert reached.wait(30)
    b.start()
    b.join(2)  # B runs to its end, or waits for A's plan lock
    release.set()
    a.join(60)
    b.join(60)
    refused = [name for name, said in outcome.items() if said != "converted"]
    assert len(refused) == 1 and "holds a conversion in progress of another input" in outcome[refused[0]], outcome
    winner, winner_src = ("B", other) if refused == ["A"] else ("A", many_shards)
    monkeypatch.undo()
    convert_checkpoint(winner_src, out, array_size=2, array_index=0 if winner == "B" else 1, target=LEGACY_TARGET)
    assert finalize(out) is not None
    assert verify_conversion(winner_src, out).ok
    if winner == "A":
        assert tree_bytes(out) == tree_bytes(single_run)


def test_the_documented_kubernetes_indexed_job_gives_the_single_run_bytes(many_shards, single_run, tmp_path):
    """docs/job-arrays.md's Indexed Job, pod by pod: each runs the YAML's command with the JOB_COMPLETION_INDEX
    Kubernetes sets (no completion count is set: --array-size is the Job's completions); then finalize."""
    import re
    import shlex

    guide = (Path(__file__).resolve().parent.parent / "docs" / "job-arrays.md").read_text()
    job = guide.split("Kubernetes Indexed Job:")[1].split("```yaml\n")[1].split("```")[0]
    completions = int(re.search(r"completions: (\d+)", job)[1])
    command = re.search(r"args:\n\s+- (w4a8conv convert .*?)\s+#", job, flags=re.S)[1]
    out = tmp_path / "out"
    argv = shlex.split(command.replace("/models/DeepSeek-R1-W4A8-prepacked", str(out)))
    argv = [str(many_shards) if a == "/models/DeepSeek-R1-W4A8" else a for a in argv][1:]
    assert argv[0] == "convert" and "--array-size" in argv and "--array-index" not in argv
    for index in range(completions):
        env = {"JOB_COMPLETION_INDEX": str(index), "SLURM_ARRAY_TASK_ID": ""}
        result = runner.invoke(app, [*argv, "--target", LEGACY_TARGET], env=env)
        assert result.exit_code == 0, result.stderr
    assert runner.invoke(app, ["finalize", str(out)]).exit_code == 0
    assert tree_bytes(out) == tree_bytes(single_run)


def test_completions_cost_the_same_whatever_is_pending():
    """The conversion's main loop takes each finished unit at a constant cost: with wait(FIRST_COMPLETED)
    over 20,000 pending units it spent 35 CPU-seconds (DeepSeek-R1 has about 90,000: ten minutes)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from w4a8conv.converting.convert import _Completions

    completions, pool = _Completions(), ThreadPoolExecutor(4)
    started = time.process_time()
    pending = {completions.watch(pool.submit(int, i)): i for i in range(20_000)}
    while pending:
        pending.pop(completions.next())
    pool.shutdown()
    assert time.process_time() - started < 5
