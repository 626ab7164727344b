"""Put a vllm-ascend release's Python package in a folder, from its source distribution on PyPI.

Releases after 0.26.0rc1 are on the index as sdists only, whose build needs Ascend's CANN; their
``vllm_ascend`` package is plain Python with two generated modules, which this writes as a build would
(A2 device type, the release's version). ``make test-engine-release`` puts the folder on ``sys.path``.

Usage: python scripts/vllm_ascend_release.py VERSION DEST
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
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
    package = dest / "vllm_ascend"
    (package / "_build_info.py").write_text("__device_type__ = 'A2'\n")
    (package / "_version.py").write_text(f"version = {version!r}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    unpack(sys.argv[1], Path(sys.argv[2]))
