"""The protocol every serving target implements.

A target is the processed layout one serving engine release reads: which tensors a W4A8 projection
becomes (names, dtypes, shapes), how the description types them, which sources it can serve, and
the processing that produces them from what a source layout yields (operator words, scales, the
scale_bias term).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ...safetensors_io import OutputEntry

if TYPE_CHECKING:
    import torch

    from ..projection import Projection
    from ..sources.base import Int4Packer


class ServingTarget:
    """A serving engine release's processed layout."""

    name: ClassVar[str]  # the --target value
    summary: ClassVar[str]  # one line: the engine, its releases, what it reads
    quant_type: ClassVar[str]  # how the description types every processed tensor
    engine: ClassVar[str]  # the serving engine's package
    engine_releases: ClassVar[str]  # the releases whose processing the output mirrors (PEP 440 specifiers)
    upstream: ClassVar[str]  # the code read: repository, ref, commit, file
    source_layouts: ClassVar[tuple[str, ...]]  # the source layouts it can serve

    def refusal(self, projection: Projection) -> str | None:
        """Why this target cannot serve the projection, or None (checked at plan time, from headers).

        The default refuses a source layout not in :attr:`source_layouts`; a target adds its own rules.
        """
        if projection.layout.name not in self.source_layouts:
            return f"does not read the {projection.layout.name} layout"
        return None

    def outputs(self, projection: Projection) -> list[OutputEntry]:
        """The tensors the projection becomes, in the order they are produced."""
        raise NotImplementedError

    def process(
        self,
        projection: Projection,
        tensors: dict[str, torch.Tensor],
        params_dtype: torch.dtype,
        pack_int4: Int4Packer,
    ) -> dict[str, torch.Tensor]:
        """The projection's output tensors (named as :meth:`outputs`) from its source tensors by role."""
        raise NotImplementedError

    def section(self) -> dict[str, str]:
        """What the description's ``w4a8conv`` section records about this target: the artifact contract."""
        return {
            "target": self.name,
            "engine": self.engine,
            "engine_releases": self.engine_releases,
            "upstream": self.upstream,
        }
