"""One W4A8 projection as a checkpoint holds it: the unit a source layout reads and a target writes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..safetensors_io import TensorInfo
from .sources import SourceLayout


@dataclass(frozen=True)
class Projection:
    """One W4A8 linear map (a MoE expert's gate/up/down, or a Linear) and what it becomes.

    ``group_size`` is 0 for per-channel scales. ``bias_chunks`` is the number of input chunks the
    scale_bias output keeps (16 for row-parallel projections, else 1).
    """

    prefix: str
    is_moe: bool
    layout: SourceLayout
    out_features: int
    in_features: int
    group_size: int
    bias_chunks: int
    sources: Mapping[str, TensorInfo]  # by role
    shard: str  # the output shard (named after the source shard holding the weight)

    def where(self, role: str) -> str:
        info = self.sources[role]
        return f"{info.path}: tensor {info.name}"

    @property
    def source_bytes(self) -> int:
        return sum(info.nbytes for info in self.sources.values())

    def rows_per_block(self, max_weight_bytes: int) -> int:
        """Output rows a block may hold so that its weight stays under ``max_weight_bytes`` (a multiple
        of 8, as int32 words hold 8 int4); all of them when the weight is smaller."""
        weight = self.sources["weight"].nbytes
        if weight <= max_weight_bytes:
            return self.out_features
        per_row = weight / self.out_features
        return max(8, int(max_weight_bytes / per_row) // 8 * 8)

    def row_block(self, start: int, rows: int) -> Projection:
        """This projection restricted to output rows ``[start, start + rows)``: every source tensor's
        rows for them (the first dim of each is the output dim, or half of it for packed weights)."""
        stop = min(start + rows, self.out_features)
        if start == 0 and stop == self.out_features:
            return self

        def rows_of(info: TensorInfo) -> TensorInfo:
            first, per_out = info.shape[0], info.shape[0] / self.out_features
            r0, r1 = int(start * per_out), int(stop * per_out)
            row_bytes = info.nbytes // first
            shape = (r1 - r0, *info.shape[1:])
            return replace(info, shape=shape, begin=info.begin + r0 * row_bytes, end=info.begin + r1 * row_bytes)

        sources = {role: rows_of(info) for role, info in self.sources.items()}
        return replace(self, out_features=stop - start, sources=sources)
