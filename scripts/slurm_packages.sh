#!/usr/bin/env bash
# Make Slurm (slurmctld, slurmd, the clients) and munge available for `make test-slurm`: exit 0 when
# they are installed or were just installed from the distribution's packages, 1 (saying why) when not.
set -u
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have munged && have mungekey; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "Slurm is not installed, and installing it needs root and apt-get" >&2
    exit 1
fi
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge; } >&2; then
    echo "installing slurmctld, slurmd, slurm-client and munge with apt-get failed" >&2
    exit 1
fi
have slurmctld && have munged
