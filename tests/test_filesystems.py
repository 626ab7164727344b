"""Choosing direct writes by the output's filesystem, from /proc/self/mountinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from w4a8conv.reading.filesystems import direct_io_by_default, filesystem_type

MOUNTINFO = r"""22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
41 22 0:40 / /models rw,relatime shared:20 - nfs4 srv:/export/models rw,vers=4.2
42 41 253:2 / /models/local\040disk rw,relatime shared:21 - xfs /dev/vdb rw
43 22 0:41 / /home/me/remote rw,nosuid shared:22 - fuse.sshfs me@host:/ rw
44 22 0:42 / /scratch rw shared:23 - xfs /dev/vdc rw
45 22 0:43 / /scratch rw shared:24 - nfs srv:/scratch rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/work/out", "ext4"),
        ("/dev/shm/out", "tmpfs"),
        ("/models", "nfs4"),
        ("/models/DeepSeek-R1-W4A8-prepacked", "nfs4"),
        ("/models/local disk/out", "xfs"),  # the deeper mount wins; \040 is a space
        ("/models/local diskette", "nfs4"),  # a name that only starts like the mount point
        ("/home/me/remote/out", "fuse.sshfs"),
        ("/scratch/out", "nfs"),  # mounted over an earlier mount: the later one is what is seen
    ],
)
def test_the_deepest_mount_holding_the_path_names_the_filesystem(path, expected):
    assert filesystem_type(Path(path), MOUNTINFO) == expected


def test_unknown_without_mountinfo(monkeypatch, tmp_path):
    monkeypatch.setattr("w4a8conv.reading.filesystems.MOUNTINFO", tmp_path / "missing")
    assert filesystem_type(tmp_path) is None
    assert not direct_io_by_default(tmp_path)


@pytest.mark.parametrize(("fstype", "direct"), [("ext4", True), ("xfs", True), ("nfs4", False), ("fuse.sshfs", False)])
def test_direct_writes_by_default_only_on_local_filesystems(monkeypatch, tmp_path, fstype, direct):
    monkeypatch.setattr("w4a8conv.reading.filesystems.filesystem_type", lambda path: fstype)
    assert direct_io_by_default(tmp_path) is direct
