"""Never lose or corrupt a checkpoint: atomic output, resume after kill -9, locks, full disks."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import STATE_DIR
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .conftest import LEGACY_TARGET, cli, paste
from .test_parallel import tree_bytes

runner = CliRunner()
DESCRIPTION = "quant_model_description.json"
MEDIUM = SyntheticSpec(hidden=1024, intermediate=512, experts=8, moe_layers=4, group_size=128, shards=6)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint big enough that a conversion can be caught mid-way, and its uninterrupted conversion."""
    root = tmp_path_factory.mktemp("medium")
    src = write_checkpoint(root / "src", "mindie", MEDIUM)
    reference = root / "reference"
    convert_checkpoint(src, reference, workers=1, target=LEGACY_TARGET)
    return src, reference


# --- refusing to clobber, overwrite, resume ---------------------------------------------------------------


def test_existing_outputs(source_checkpoints, converted_checkpoints, tmp_path):
    src = source_checkpoints["mindie"]
    out = tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out)[0] == 0
    before = tree_bytes(out)
    code, _, stderr = cli("convert", "--in", src, "--out", out)
    assert code == 2 and "holds a finished conversion; pass --overwrite" in stderr
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--resume")
    assert code == 0 and tree_bytes(out) == before  # nothing left to do
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--resume", "--no-checksums")
    assert code == 2 and "this conversion was started with --checksums, not --no-checksums" in stderr
    assert tree_bytes(out) == before
    code, _, stderr = cli("convert", "--in", source_checkpoints["v1.0.0-per-group"], "--out", out, "--overwrite")
    assert code == 0, stderr
    assert tree_bytes(out) == tree_bytes(converted_checkpoints["v1.0.0-per-group"])


def test_overwrite_never_deletes_foreign_files(source_checkpoints, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", out, "--overwrite")
    assert code == 2 and "--overwrite only replaces w4a8conv output" in stderr
    assert (out / "thesis.tex").read_text() == "precious" and not (out / STATE_DIR).exists()


def test_lock_stops_a_second_conversion(source_checkpoints, tmp_path):
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    lock_path = out / STATE_DIR / "lock-0-of-1"
    with open(lock_path, "w") as held:  # as another process converting into the same directory would
        held.write("4242\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", out)
    assert code == 2 and "another w4a8conv (pid 4242) is converting into it" in stderr
    assert cli("convert", "--in", source_checkpoints["mindie"], "--out", out)[0] == 0  # lock released


def _start(src: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "w4a8conv.cli", "convert", "--in", str(src), "--out", str(out), "--workers", "2"]
    cmd += ["--target", LEGACY_TARGET]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)


@pytest.mark.parametrize(
    "moment",
    ["job recorded", "first partial shard", "first finished shard", "half the shards"],
)
def test_kill_9_then_resume_is_byte_identical(medium, tmp_path, moment):
    src, reference = medium
    out = tmp_path / "out"
    shards = lambda: [p for p in out.glob("*.safetensors")]  # noqa: E731
    conditions = {
        "job recorded": lambda: (out / STATE_DIR / "job.json").exists(),
        "first partial shard": lambda: any(out.glob("*.partial")),
        "first finished shard": lambda: len(shards()) >= 1,
        "half the shards": lambda: len(shards()) >= 3,
    }
    proc = _start(src, out)
    _wait_for(conditions[moment], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if moment in ("job recorded", "first partial shard"):
        assert proc.returncode == -signal.SIGKILL  # torch alone takes longer to load than this
    if proc.returncode == -signal.SIGKILL:
        assert not (out / DESCRIPTION).exists(), "a killed conversion must not look complete"
        code, _, stderr = cli("convert", "--in", src, "--out", out)
        assert code == 2 and f"finish it with `w4a8conv convert --in {src} --out {out} --resume`" in stderr
        assert "--overwrite" not in stderr
    code, _, stderr = cli("convert", "--in", src, "--out", out, "--resume")
    assert code == 0, stderr
    assert tree_bytes(out) == tree_bytes(reference)


def test_disk_full_before_start(source_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "out")
    assert code == 2 and "GB free; free space (or choose an --out with room), then run the command again" in stderr
    assert not (tmp_path / "out").exists()  # nothing left behind: a plain rerun works
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "dry", "--dry-run")
    assert code == 2 and "--resume" not in stderr and not (tmp_path / "dry").exists()
    (tmp_path / "empty").mkdir()  # an --out the user made is left, as it was
    assert cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "empty")[0] == 2
    assert list((tmp_path / "empty").iterdir()) == []


def test_disk_full_midway_is_resumable(medium, tmp_path, monkeypatch):
    src, reference = medium
    out = tmp_path / "out"
    real_fallocate = os.posix_fallocate
    calls = {"n": 0}

    def filling_up(fd, offset, length):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", filling_up)
    code, _, stderr = cli("convert", "--in", src, "--out", out)
    assert code == 1 and len([line for line in stderr.splitlines() if line.startswith("error: ")]) == 1
    assert ".safetensors.partial: no space left on device while writing it; " in stderr
    assert re.search(r"; \d+\.\d\d GB still to write \(\d+ of 6 shards unfinished, \d+\.\d\d GB free\)", stderr)
    assert stderr.rstrip().endswith(f"free space, then `w4a8conv convert --in {src} --out {out} --resume`")
    assert "Traceback" not in stderr and not (out / DESCRIPTION).exists()
    monkeypatch.setattr(os, "posix_fallocate", real_fallocate)
    assert paste(stderr).exit_code == 0
    assert tree_bytes(out) == tree_bytes(reference)


def test_read_only_output(source_checkpoints, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "out" / STATE_DIR))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, stderr = cli("convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "out")
    assert code == 2 and "read-only file system; choose an --out on a writable filesystem" in stderr
    assert stderr.startswith(f"error: --out {tmp_path / 'out'}: cannot be written: ") and stderr.count("\n") == 1


def test_an_out_under_a_file_is_bad_input(source_checkpoints, tmp_path):
    (tmp_path / "file").write_text("x")
    for extra in ((), ("--dry-run",)):
        code, _, stderr = cli(
            "convert", "--in", source_checkpoints["mindie"], "--out", tmp_path / "file" / "out", *extra
        )
        assert code == 2 and f"{tmp_path / 'file'} is a file, so no directory can be made there" in stderr


def test_every_writer_takes_the_directory_lock(source_checkpoints, tmp_path):
    """A running job of an array holds the directory's lock shared: another share may run beside it, but
    neither --overwrite, nor a single conversion, nor finalize."""
    src = source_checkpoints["mindie"]
    out = tmp_path / "out"
    assert cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "0")[0] == 0
    with open(out / STATE_DIR / "lock", "r+") as running_share:
        fcntl.flock(running_share.fileno(), fcntl.LOCK_SH)
        for args in (["--overwrite"], ["--resume"]):
            code, _, stderr = cli("convert", "--in", src, "--out", out, *args)
            assert code == 2 and "the jobs of an array are converting into it" in stderr, stderr
        code, _, stderr = cli("finalize", out)
        assert code == 2 and "the jobs of an array are converting into it" in stderr
        assert cli("convert", "--in", src, "--out", out, "--array-size", "2", "--array-index", "1")[0] == 0
    assert cli("finalize", out)[0] == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("json_output", [False, True])
def test_an_interrupted_conversion_says_so_in_one_line_and_resumes(medium, tmp_path, sent, code, json_output):
    src, reference = medium
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "w4a8conv.cli", "convert", "--in", str(src), "--out", str(out), "--workers", "2"]
    cmd += ["--target", LEGACY_TARGET, *(["--json"] if json_output else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(out.glob("*.partial")), proc)
    proc.send_signal(sent)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"error: --out {out}: interrupted by {sent.name} with ")
    assert errors[0].endswith(f" shards written; finish it with `w4a8conv convert --in {src} --out {out} --resume`")
    if json_output:
        assert json.loads(stdout) == {"ok": False, "error": errors[0].removeprefix("error: ")}
    assert not (out / DESCRIPTION).exists()
    # the command as printed, pasted: the target it was started with comes from the plan
    assert paste(errors[0]).exit_code == 0
    assert tree_bytes(out) == tree_bytes(reference)


def test_open_files_do_not_grow_with_the_shard_count(tmp_path):
    """Hundreds of shards under a limit of 128 open files: a writer holds no descriptor between writes."""
    src = write_checkpoint(tmp_path / "src", "mindie", SyntheticSpec(moe_layers=6, experts=8, shards=300))
    shards = len(list(src.glob("*.safetensors")))
    assert shards > 150  # two descriptors a shard would exceed the limit
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from w4a8conv.cli import main\n"
        "sys.argv = ['w4a8conv', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = ["convert", "--in", str(src), "--out", str(tmp_path / "out"), "--target", LEGACY_TARGET, "--workers", "4"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert verify_conversion(src, tmp_path / "out").ok


# Every memory budget (row blocks, bytes held for the hash, idle staging buffers) set to the same size,
# small enough that the test's tensors exceed it: what is left to grow with a tensor is what must not.
_CONVERT_WITH_BLOCK = (
    "import sys\n"
    "import w4a8conv.converting.convert\n"
    "from w4a8conv.safetensors_io import staging, writer\n"
    "if sys.argv[1] != 'default':\n"
    "    w4a8conv.converting.convert.BLOCK_BYTES = writer.RETAINED_BYTES = int(sys.argv[1])\n"
    "    staging.STAGING = staging.StagingPool(int(sys.argv[1]))\n"
    "from w4a8conv.cli import main\n"
    "sys.argv = ['w4a8conv', *sys.argv[2:]]\n"
    "main()\n"
)
# The conversion ends with os._exit, so its peak is read by a fresh parent of its own.
_PEAK_RSS_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)


def _peak_rss(src: Path, out: Path, block: str) -> int:
    """Peak RSS in bytes of a 4-worker conversion in a fresh process, with every budget set to ``block``."""
    args = ["convert", "--in", str(src), "--out", str(out), "--target", LEGACY_TARGET, "--workers", "4"]
    child = [sys.executable, "-c", _CONVERT_WITH_BLOCK, block, *args]
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_CHILD, *child], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_memory_does_not_grow_with_the_size_of_one_tensor(tmp_path):
    """Weights of 8 and 64 MiB, with every memory budget at 4 MiB: the peak RSS is the same to within 48 MB,
    where whole tensors would add about 56 MB per worker. And a default conversion stays under 1 GB."""
    peaks = {}
    for inter in (4096, 32768):  # mindie expert weights of [inter, 2048] int8: 8 and 64 MiB
        spec = SyntheticSpec(
            hidden=2048,
            intermediate=inter,
            experts=1,
            dense_layers=0,
            moe_layers=1,
            group_size=256,
            vocab=64,
            shards=2,
            w4a8_linear=False,
        )
        src = write_checkpoint(tmp_path / f"src-{inter}", "mindie", spec)
        peaks[inter] = _peak_rss(src, tmp_path / f"out-{inter}", str(4 << 20))
        if inter == 32768:
            assert verify_conversion(src, tmp_path / f"out-{inter}").ok
            assert _peak_rss(src, tmp_path / "out-default", "default") < 1e9
    assert peaks[32768] - peaks[4096] < 48e6, peaks
