"""Holding Python's cyclic garbage collector off while a function builds many long-lived objects.

Reading a DeepSeek-R1's headers and planning its conversion make millions of objects (tensor
records, plan entries) that live until the command ends and form no cycles; each collection walks
all of them again, which cost a third of the planning time (docs/performance.md).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def holding_gc(function: F) -> F:
    """Run ``function`` with the collector off, then freeze what exists out of later collections."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():  # an outer caller holds it already
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.freeze()
            gc.enable()

    return wrapper  # type: ignore[return-value]
