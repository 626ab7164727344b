"""The registry of source layouts: one module each, behind :class:`~.base.SourceLayout`.

Adding a layout is one module implementing the protocol (detection, consistency rules, the math, a
synthetic writer, a numpy oracle for ``verify``), its tests, and one line in ``SOURCES``. The
``--layout`` choices, ``inspect``, ``verify``, the tests and the bench all read this registry.
"""

from __future__ import annotations

from ...errors import BadInputError
from .base import ModuleHeaders, SourceLayout
from .compressed_tensors import CompressedTensorsLayout
from .mindie import MindieLayout
from .v1_per_channel import V1PerChannelLayout
from .v1_per_group import V1PerGroupLayout

SOURCES: dict[str, SourceLayout] = {
    layout.name: layout
    for layout in (MindieLayout(), V1PerGroupLayout(), V1PerChannelLayout(), CompressedTensorsLayout())
}
SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)
CURRENT_MSMODELSLIM_LAYOUT = "v1.0.0-per-channel"  # all that msModelSlim 26.1's saver writes


def get_source(name: str) -> SourceLayout:
    """The layout called ``name``; a bad name is bad input (it comes from the command line or a file)."""
    try:
        return SOURCES[name]
    except KeyError:
        raise BadInputError(f"unknown source layout {name!r}; choose one of {', '.join(SOURCE_NAMES)}") from None


def detect_source(module: ModuleHeaders) -> SourceLayout | None:
    """The layout whose tensors look like this projection's, or None."""
    return next((layout for layout in SOURCES.values() if layout.matches(module)), None)


__all__ = ["SOURCES", "SOURCE_NAMES", "ModuleHeaders", "SourceLayout", "detect_source", "get_source"]
