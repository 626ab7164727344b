"""The registry of serving targets: one module each, behind :class:`~.base.ServingTarget`.

Adding a target is one module implementing the protocol, its tests, and one line in ``TARGETS``
(oldest first: the last is the default, the newest engine release).
"""

from __future__ import annotations

from ...errors import BadInputError
from .base import ServingTarget
from .vllm_ascend_023 import VllmAscend023
from .vllm_ascend_025 import VllmAscend025

TARGETS: dict[str, ServingTarget] = {target.name: target for target in (VllmAscend023(), VllmAscend025())}
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)
DEFAULT_TARGET = TARGET_NAMES[-1]


def get_target(name: str) -> ServingTarget:
    """The target called ``name``; a bad name is bad input (it comes from the command line or a file)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise BadInputError(f"--target {name}: choose one of {', '.join(TARGET_NAMES)}") from None


__all__ = ["DEFAULT_TARGET", "TARGETS", "TARGET_NAMES", "ServingTarget", "get_target"]
