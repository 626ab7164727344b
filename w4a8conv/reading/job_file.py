"""The head of a conversion's saved plan (``DST/.w4a8conv/job.json``): its fingerprint and the choices
the conversion was started with, read without parsing the plan (tens of MB for DeepSeek-R1).

job.json is ``{"fingerprint":"<64 hex digits>","plan":<canonical JSON>}``: the fingerprint can be read
first and checked against the exact bytes it was computed from; the plan's first keys are its choices
(``ConversionPlan.to_json`` puts them before the tensors).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from ..names import JOB_FILE, STATE_DIR

HEAD = b'{"fingerprint":"'
MIDDLE = b'","plan":'
TAIL = b"}\n"
CHOICE_KEYS = ("source", "target", "params_dtype", "checksums")
_HEAD_BYTES = 1 << 16  # the choices come before the first tensor, well inside this


def fingerprint_of(raw: bytes) -> str | None:
    """The fingerprint at the start of a saved plan, or None if it does not start like one."""
    if not raw.startswith(HEAD) or raw[len(HEAD) + 64 : len(HEAD) + 64 + len(MIDDLE)] != MIDDLE:
        return None
    digits = raw[len(HEAD) : len(HEAD) + 64].decode("ascii", "replace")
    return digits if all(c in "0123456789abcdef" for c in digits) else None


def saved_choices(path: Path) -> dict[str, Any] | None:
    """``source``, ``target``, ``params_dtype`` and ``checksums`` of the saved plan at ``path``; None if
    it cannot be read or does not start like a plan."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return None
    if fingerprint_of(head) is None:
        return None
    text = head[len(HEAD) + 64 + len(MIDDLE) :].decode("utf-8", "replace")
    decoder, at, found = json.JSONDecoder(), 1, {}
    try:
        while at < len(text) and not set(CHOICE_KEYS) <= found.keys():
            key, at = decoder.raw_decode(text, at)
            value, at = decoder.raw_decode(text, at + 1)  # after the colon
            found[key] = value
            at += 1  # the comma
    except ValueError:
        return None
    return found if set(CHOICE_KEYS) <= found.keys() else None


def resume_command(dst: Path, source: Path | str | None = None, share: tuple[int, int] | None = None) -> str:
    """The command that finishes the conversion into ``dst``, ready to paste: its choices come from the
    saved plan, so none is repeated (``source``: its input, else the one the saved plan names). For one
    ``share`` (size, index) of a job array: the command that reruns that job."""
    if source is None:
        saved = saved_choices(dst / STATE_DIR / JOB_FILE)
        source = saved["source"] if saved is not None else "SRC"
    command = f"w4a8conv convert --in {shlex.quote(str(source))} --out {shlex.quote(str(dst))}"
    if share is not None and share[0] > 1:
        return f"{command} --array-size {share[0]} --array-index {share[1]}"
    return f"{command} --resume"
