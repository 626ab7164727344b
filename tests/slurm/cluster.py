"""A private single-node Slurm cluster for the tests: its own config, state, ports and munge socket under
a temporary directory. It starts munged, slurmctld and slurmd in the foreground as its own child
processes and stops exactly those; nothing system-wide is touched (no /etc/slurm, no system munged)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_programs() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is what a client command needs."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.node = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> Cluster:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        key = root / "munge" / "munge.key"
        subprocess.run([_program("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        socket_path = root / "munge" / "munge.sock"
        self._spawn(
            [
                _program("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait(lambda: socket_path.exists(), "munged's socket")
        controller, node = _free_port(), _free_port()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=w4a8conv-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={controller}",
                    f"SlurmdPort={node}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={socket_path}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/backfill",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "ReturnToService=2",
                    "SchedulerParameters=defer_batch",
                    "MinJobAge=600",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self._spawn([_program("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(self._node_ready, "the node to come up", timeout=60)
        return self

    def _spawn(self, command: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (lives as long as the daemon)
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a daemon exited while waiting for {what}: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def _node_ready(self) -> bool:
        done = self.run("sinfo", "-h", "-o", "%T", check=False)
        return done.returncode == 0 and done.stdout.strip() in ("idle", "mixed", "allocated")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))

    def run(self, *command: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [_program(command[0]), *command[1:]], capture_output=True, text=True, env=self.env, cwd=cwd
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}")
        return done

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        """Submit; the job id (``sbatch --parsable``)."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def states(self, job: str) -> dict[str, tuple[str, str]]:
        """Each task's (state, exit code) by id: ``JOB_TASK`` for array tasks."""
        done = self.run("scontrol", "-o", "show", "job", job, check=False)
        states = {}
        for line in done.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            states[key] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
        return states

    def wait(self, job: str, timeout: float = 300) -> dict[str, tuple[str, str]]:
        """Wait until every task of ``job`` has ended; their states."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states(job)
            if states and all(state in ended for state, _ in states.values()):
                return states
            time.sleep(0.5)
        raise RuntimeError(f"job {job} did not end: {self.states(job)}\n{self.logs()}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
