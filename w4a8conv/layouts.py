"""The msModelSlim W4A8_DYNAMIC source layouts: one class each, behind one small protocol.

A layout says what a projection's tensors look like on disk and how to turn them into the two
things the processing needs from it: 1.0.0-style int4 pair bytes and the scale_bias chunks.
Adding a layout means adding one class here and one line to ``SOURCE_LAYOUTS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BadInputError

if TYPE_CHECKING:  # the math (and torch) is imported when a projection is processed, not when planning
    from collections.abc import Callable

    import torch

    # int8 int4 values [out, in] -> operator words int32 [in, out/8]
    Int4Packer = Callable[[torch.Tensor], torch.Tensor]

W4A8_TYPE = "W4A8_DYNAMIC"
# Our output's quant type: a stock vllm-ascend has no scheme for it and raises NotImplementedError,
# instead of re-processing already processed tensors.
PREPACKED_TYPE = "W4A8_DYNAMIC_PREPACKED"
PROCESSED_FORMAT = "processed"


class SourceLayout:
    """Protocol of a source layout. Attributes describe the tensors; methods are pure."""

    name: str
    packed_on_disk: bool  # weight int8 [out/2, in] (two int4 per byte) instead of [out, in]
    per_group: bool  # has weight_scale_second [out, in/g]
    stores_scale_bias: bool  # has scale_bias [out, chunks] computed by msModelSlim

    def operator_words(self, weight: torch.Tensor, where: str, pack_int4: Int4Packer) -> torch.Tensor:
        """The weight as the operator's int32 words ``[in, out/8]``; ``pack_int4`` packs unpacked int4."""
        raise NotImplementedError

    def scale_bias(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_scale_second: torch.Tensor | None,
        stored: torch.Tensor | None,
        num_chunks: int,
    ) -> torch.Tensor:
        """scale_bias as float32 ``[out, num_chunks]``."""
        raise NotImplementedError


class MindieLayout(SourceLayout):
    """Old msModelSlim output: one int4 per int8 byte, per-group scales, no scale_bias."""

    name = "mindie"
    packed_on_disk = False
    per_group = True
    stores_scale_bias = False

    def operator_words(self, weight: torch.Tensor, where: str, pack_int4: Int4Packer) -> torch.Tensor:
        from .packing import int4_range_violation

        violation = int4_range_violation(weight)
        if violation is not None:
            raise BadInputError(f"{where}: int4 weight holds values {violation[0]}..{violation[1]}, outside -8..7")
        return pack_int4(weight)

    def scale_bias(self, weight, weight_scale, weight_scale_second, stored, num_chunks):
        from .scales import scale_bias_chunks

        return scale_bias_chunks(weight, weight_scale, weight_scale_second, num_chunks)


class V1PerGroupLayout(SourceLayout):
    """msModelSlim 1.0.0 with group_size > 0: packed weight, per-group scales, stored scale_bias."""

    name = "v1.0.0-per-group"
    packed_on_disk = True
    per_group = True
    stores_scale_bias = True

    def operator_words(self, weight: torch.Tensor, where: str, pack_int4: Int4Packer) -> torch.Tensor:
        from .packing import int4_pair_rows_to_int32_words

        return int4_pair_rows_to_int32_words(weight)

    def scale_bias(self, weight, weight_scale, weight_scale_second, stored, num_chunks):
        import torch

        assert stored is not None
        return stored.to(torch.float32).reshape(stored.shape[0], num_chunks)


class V1PerChannelLayout(V1PerGroupLayout):
    """msModelSlim 1.0.0 with group_size 0: packed weight, one scale per output channel."""

    name = "v1.0.0-per-channel"
    per_group = False


SOURCE_LAYOUTS: tuple[SourceLayout, ...] = (MindieLayout(), V1PerGroupLayout(), V1PerChannelLayout())


def layout_from_evidence(packed_on_disk: bool, per_group: bool) -> SourceLayout | None:
    """The layout whose tensors look like this, or None (e.g. unpacked per-channel is no known layout)."""
    for layout in SOURCE_LAYOUTS:
        if layout.packed_on_disk == packed_on_disk and layout.per_group == per_group:
            return layout
    return None
