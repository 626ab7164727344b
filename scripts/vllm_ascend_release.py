"""Put a vllm-ascend release's Python package in a folder, from its source distribution on PyPI or from a
source tree (``--tree``).

Releases after 0.26.0rc1 are on the index as sdists only, whose build needs Ascend's CANN; their
``vllm_ascend`` package is plain Python with two generated modules, which this writes as a build would
(A2 device type, the version: a tree's gets +g and its commit where it is a git checkout).
``make test-engine-release`` and ``make test-engine-src`` put the folder on ``sys.path``.

Usage: python scripts/vllm_ascend_release.py VERSION DEST [--tree SRC]
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/simple/vllm-ascend/"


def sdist(version: str) -> tuple[str, str]:
    """The URL and sha256 of the release's source distribution, from PyPI's simple index (its JSON form)."""
    request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    for entry in files:
        if entry["filename"] == f"vllm_ascend-{version}.tar.gz":
            return entry["url"], entry["hashes"]["sha256"]
    raise SystemExit(f"vllm-ascend {version}: no source distribution on {INDEX}")


def unpack(version: str, dest: Path) -> None:
    """The release's package from its sdist on PyPI, its sha256 checked."""
    url, sha256 = sdist(version)
    with urllib.request.urlopen(url, timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 differs from the one PyPI lists")
    shutil.rmtree(dest / "vllm_ascend", ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 1 and parts[1] == "vllm_ascend" and (member.isfile() or member.isdir()):
                member.name = str(Path(*parts[1:]))
                members.append(member)
        archive.extractall(dest, members=members, filter="data")
    write_generated(dest / "vllm_ascend", version)


def copy_tree(tree: Path, version: str, dest: Path) -> None:
    """The package of a source tree (a checkout of main or of a release branch)."""
    if not (tree / "vllm_ascend").is_dir():
        raise SystemExit(f"{tree}: no vllm_ascend package; point --tree at a vllm-ascend checkout")
    shutil.rmtree(dest / "vllm_ascend", ignore_errors=True)
    shutil.copytree(tree / "vllm_ascend", dest / "vllm_ascend")
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    write_generated(dest / "vllm_ascend", f"{version}+g{commit}" if commit else version)


def write_generated(package: Path, version: str) -> None:
    """The two modules vllm-ascend's build generates: the device type (A2) and the version."""
    (package / "_build_info.py").write_text("__device_type__ = 'A2'\n")
    (package / "_version.py").write_text(f"version = {version!r}\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 4 and args[2] == "--tree":
        copy_tree(Path(args[3]), args[0], Path(args[1]))
    elif len(args) == 2:
        unpack(args[0], Path(args[1]))
    else:
        raise SystemExit(__doc__.strip().splitlines()[-1])
