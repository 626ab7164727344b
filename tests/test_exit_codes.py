"""One table of error to exit code, followed by every command (docs/errors.md)."""

from __future__ import annotations

import errno

import pytest

from w4a8conv.errors import BadInputError, Terminated, W4A8ConvError, exit_status

from .conftest import cli


@pytest.mark.parametrize(
    ("error", "line", "code"),
    [
        (BadInputError("in/x.safetensors: tensor t: bad"), "in/x.safetensors: tensor t: bad", 2),
        (W4A8ConvError("out: shares 1 of 2 are not finished"), "out: shares 1 of 2 are not finished", 1),
        (OSError(errno.ENOSPC, "No space left on device", "out/a.partial"), "out/a.partial: no space left", 1),
        (PermissionError(errno.EACCES, "Permission denied", "in/y"), "in/y: permission denied", 1),
        (KeyboardInterrupt(), "interrupted by SIGINT", 130),
        (Terminated(15), "interrupted by SIGTERM", 143),
    ],
)
def test_each_kind_of_error_has_one_line_and_one_code(error, line, code):
    message, status = exit_status(error)
    assert message.startswith(line) and status == code


def test_an_unexpected_error_is_left_to_the_caller():
    assert exit_status(ValueError("bug")) is None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["inspect", "/nonexistent/model"], 2),  # bad input
        (["finalize", "/nonexistent/out"], 2),  # nothing to finalize: an argument that is wrong
        (["convert", "--in", "/nonexistent/model", "--out", "/tmp/never-written", "--workers", "0"], 2),
        (["verify", "/nonexistent/model", "/nonexistent/out"], 2),
    ],
)
def test_commands_follow_the_table(args, code):
    got, _, stderr = cli(*args)
    assert got == code and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
