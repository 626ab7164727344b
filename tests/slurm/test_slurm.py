"""The Slurm example of docs/job-arrays.md on a real single-node Slurm (``make test-slurm``): the array script and
its submission, copied from that page, give the bytes of a single-process conversion; and the four ways
it went wrong before (two arrays into one directory, a failed ``finalize --verify``, rerunning one task,
a dependency that never fires after a retry)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from w4a8conv.converting.convert import convert_checkpoint
from w4a8conv.names import DESCRIPTION_FILE, STATE_DIR
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint
from w4a8conv.verify import verify_conversion

from .cluster import Cluster, missing_programs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "job-arrays.md"
SRC, OUT = "/models/DeepSeek-R1-W4A8", "/models/DeepSeek-R1-W4A8-prepacked"


def guide_blocks() -> list[str]:
    """The bash blocks of the Slurm section, in order: the script, the submission, the rerun."""
    section = GUIDE.read_text().split("Slurm: the array script")[1].split("Kubernetes Indexed Job:")[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def adapted(block: str, src: Path, out: Path) -> str:
    """A block of the guide for this machine: its paths, one CPU per task."""
    text = block.replace(OUT, str(out)).replace(SRC, str(src))
    return text.replace("--workers 8", "--workers 1").replace("--cpus-per-task=8", "--cpus-per-task=1")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_programs():
        pytest.fail(f"Slurm or munge is not installed ({', '.join(missing_programs())}): run `make test-slurm`")
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    bin_dir = str(Path(sys.executable).parent)  # the venv's w4a8conv, for the jobs
    cluster.env["PATH"] = bin_dir + os.pathsep + cluster.env.get("PATH", "")
    cluster.env["CI"] = "true"
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    src = write_checkpoint(root / "src", "v1.0.0-per-channel", SyntheticSpec(shards=9))
    other = write_checkpoint(root / "other", "v1.0.0-per-channel", SyntheticSpec(shards=9, seed=5))
    single = convert_checkpoint(src, root / "single").out_dir
    return src, other, single


def submit_readme(cluster: Cluster, src: Path, out: Path, work: Path, script_prefix: str = "") -> tuple[str, str]:
    """Write the guide's convert.sbatch and run its submission block: (array job, finalize job)."""
    script, submission, _ = guide_blocks()
    text = adapted(script, src, out)
    if script_prefix:  # after the #SBATCH lines, which must come first
        lines = text.splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        text = "\n".join([*lines[: last + 1], script_prefix, *lines[last + 1 :]]) + "\n"
    work.mkdir(parents=True, exist_ok=True)
    (work / "convert.sbatch").write_text(text)
    commands = "set -e\n" + adapted(submission, src, out) + 'echo "$job"\n'
    done = subprocess.run(["bash", "-c", commands], cwd=work, env=cluster.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    finalize_job, array_job = done.stdout.split()[-2:]
    return array_job, finalize_job


def test_the_readme_array_and_finalize_give_the_single_run_bytes(cluster, checkpoints, tmp_path):
    src, _, single = checkpoints
    out = tmp_path / "out"
    array, final = submit_readme(cluster, src, out, tmp_path / "work")
    assert all(state == "COMPLETED" for state, _ in cluster.wait(array).values())
    assert cluster.wait(final)[final][0] == "COMPLETED", cluster.logs()
    assert tree(out) == tree(single)


def test_two_arrays_into_one_directory_never_mix(cluster, checkpoints, tmp_path):
    """A copy-paste slip: two arrays on different inputs into one new --out, started together. One
    array's tasks convert; every task of the other is refused (exit 2); the result is the winner's."""
    src, other, single = checkpoints
    out = tmp_path / "out"
    script = adapted(guide_blocks()[0], src, out)
    (tmp_path / "a.sbatch").write_text(script)
    (tmp_path / "b.sbatch").write_text(script.replace(str(src), str(other)))
    a = cluster.sbatch(str(tmp_path / "a.sbatch"), cwd=tmp_path)
    b = cluster.sbatch(str(tmp_path / "b.sbatch"), cwd=tmp_path)
    states = {"a": cluster.wait(a), "b": cluster.wait(b)}
    outcome = {name: {state for state, _ in tasks.values()} for name, tasks in states.items()}
    winner = next(name for name, seen in outcome.items() if seen == {"COMPLETED"})
    loser = "b" if winner == "a" else "a"
    assert outcome[loser] == {"FAILED"} and {code for _, code in states[loser].values()} == {"2:0"}
    final = cluster.sbatch("--wrap", f"w4a8conv finalize {out}", cwd=tmp_path)
    assert cluster.wait(final)[final][0] == "COMPLETED"
    assert verify_conversion(src if winner == "a" else other, out).ok
    if winner == "a":
        assert tree(out) == tree(single)


def test_a_failed_finalize_verify_publishes_nothing(cluster, checkpoints, tmp_path):
    src, _, _ = checkpoints
    out = tmp_path / "out"
    array = cluster.sbatch(str(_script(tmp_path, src, out)), cwd=tmp_path)
    cluster.wait(array)
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # same size: its share still looks done
    shard.write_bytes(bytes(data))
    _, submission, _ = guide_blocks()
    finalize_command = re.search(r'"(w4a8conv finalize .*?)"', adapted(submission, src, out), flags=re.S)[1]
    final = cluster.sbatch("--wrap", finalize_command, cwd=tmp_path)
    assert cluster.wait(final)[final] == ("FAILED", "1:0")
    assert not (out / DESCRIPTION_FILE).exists() and (out / STATE_DIR).is_dir()
    again = cluster.sbatch("--wrap", f"w4a8conv finalize {out}", cwd=tmp_path)  # a retried plain finalize
    assert cluster.wait(again)[again] == ("FAILED", "1:0")
    assert not (out / DESCRIPTION_FILE).exists()


def _script(work: Path, src: Path, out: Path) -> Path:
    path = work / "convert.sbatch"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(adapted(guide_blocks()[0], src, out))
    return path


def test_a_failed_task_rerun_as_the_readme_says_then_finalize(cluster, checkpoints, tmp_path):
    """Task 2 fails once (a flaky node). An afterok finalize never starts; the guide's afterany one
    runs and refuses the missing share; `sbatch --array=2 convert.sbatch` is refused rather than
    converting share 0; the guide's requeue and finalize again give the single run's bytes."""
    src, _, single = checkpoints
    out, work = tmp_path / "out", tmp_path / "work"
    flaky = (
        f'if [ "$SLURM_ARRAY_TASK_ID" = 2 ] && [ ! -e {work}/failed-once ]; then touch {work}/failed-once; exit 3; fi'
    )
    array, final = submit_readme(cluster, src, out, work, script_prefix=flaky)
    never = cluster.sbatch(f"--dependency=afterok:{array}", "--wrap", "true", cwd=work)
    states = cluster.wait(array)
    assert states[f"{array}_2"] == ("FAILED", "3:0") and len(states) == 8
    assert cluster.wait(final)[final] == ("FAILED", "1:0")  # finalize: share 2 of 8 is not finished
    assert not (out / DESCRIPTION_FILE).exists()
    wrong = cluster.sbatch("--array=2", "convert.sbatch", cwd=work)
    assert cluster.wait(wrong)[f"{wrong}_2"] == ("FAILED", "2:0")  # refused: SLURM_ARRAY_TASK_COUNT=1
    reason = cluster.run("squeue", "-h", "-j", never, "-o", "%r").stdout.strip()
    assert reason == "DependencyNeverSatisfied"
    cluster.run("scancel", never)
    _, _, rerun = guide_blocks()
    commands = f"set -e\njob={array}\n" + adapted(rerun, src, out) + "\n"
    done = subprocess.run(["bash", "-c", commands], cwd=work, env=cluster.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = done.stdout.split()[-1]
    assert cluster.wait(array)[f"{array}_2"][0] == "COMPLETED"
    assert cluster.wait(final)[final][0] == "COMPLETED", cluster.logs()
    assert tree(out) == tree(single)


def test_the_cluster_is_private(cluster):
    """It runs on its own config and munge socket (nothing under /etc/slurm is read or written)."""
    assert cluster.env["SLURM_CONF"].startswith(str(cluster.root))
    assert f"socket={cluster.root}" in Path(cluster.env["SLURM_CONF"]).read_text()
    assert shutil.which("sbatch")
