"""The one error type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

import errno
import signal

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# Killed by a signal: 128 + its number, as shells report it.
EXIT_INTERRUPTED = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (as Python raises KeyboardInterrupt for SIGINT)."""


def interruption(error: BaseException) -> tuple[str, int]:
    """The signal's name and the exit code for KeyboardInterrupt or :class:`Terminated`."""
    number = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
    return number.name, EXIT_INTERRUPTED[number]


class W4A8ConvError(Exception):
    """An error with a message meant for a person; the CLI prints it without a traceback.

    Args:
        message: one line naming the file and tensor concerned and, where possible, what to do.
        exit_code: ``EXIT_BAD_INPUT`` for input the tool refuses, ``EXIT_FAILURE`` otherwise.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class BadInputError(W4A8ConvError):
    """The input checkpoint (or an argument) is wrong; nothing was or will be written."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_BAD_INPUT)


_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on device; free space, then run the command again",
    errno.EDQUOT: "disk quota exceeded; free space, then run the command again",
    errno.EROFS: "read-only file system; choose an --out on a writable filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def exit_status(error: BaseException) -> tuple[str, int] | None:
    """The one line and the exit code for an error a command ends with; None for one nobody expected.

    The table every command follows: bad input 2 (found before anything is written), a failure while
    working 1 (I/O, a failed verification), a signal 128 + its number.
    """
    if isinstance(error, W4A8ConvError):
        return error.message, error.exit_code
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        name, code = interruption(error)
        return f"interrupted by {name}", code
    if isinstance(error, OSError):
        return describe_os_error(error), EXIT_FAILURE
    return None


def describe_os_error(error: OSError) -> str:
    """One line for an I/O failure: the file, what happened and what to do."""
    what = _OS_ERROR_HINTS.get(error.errno or 0, error.strerror or str(error))
    return f"{error.filename or 'I/O'}: {what}"
