"""Which filesystem a path lives on, and whether w4a8conv reads and writes there with O_DIRECT by default.

Direct I/O was measured on a local ext4 (and is correct wherever the kernel accepts it). On network
and FUSE filesystems an O_DIRECT read or write can wait for the server on every call, which nobody
here has measured, so those get the page cache unless the user asks for ``--direct-io``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Local filesystems whose O_DIRECT path streams large aligned reads and writes to and from the device.
DIRECT_IO_FILESYSTEMS = frozenset({"ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs", "bcachefs", "jfs", "tmpfs"})


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type (``ext4``, ``nfs4``, ``fuse.sshfs``...) of the filesystem holding ``path``, or None if unknown.

    ``path`` need not exist yet: its nearest existing ancestor decides. ``mountinfo`` is the text of
    ``/proc/self/mountinfo`` (read when not given; None where there is none, as off Linux).
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = Path(os.path.realpath(path))
    best: tuple[int, str] | None = None  # (depth of the mount point, fstype); a later equal mount wins
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        after = fields[fields.index("-") + 1 :]
        if not after:
            continue
        mount_point = Path(_unescape(fields[4]))
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, after[0])
    return best[1] if best else None


def direct_io_by_default(path: Path) -> bool:
    """Whether files under ``path`` are read or written with O_DIRECT when the user does not say."""
    return filesystem_type(path) in DIRECT_IO_FILESYSTEMS
