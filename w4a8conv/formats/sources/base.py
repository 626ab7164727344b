"""The protocol every source layout implements, and what the planner tells it about one projection.

A source layout is one way W4A8 weights are stored on disk (msModelSlim's mindie, 1.0.0 per-group,
1.0.0 per-channel...). It owns everything that depends on that: recognising a projection's tensors,
their consistency rules, turning them into the operator's int4 words and the scale_bias term, writing
synthetic checkpoints, and a numpy oracle for ``verify``. Serving targets (``w4a8conv.formats.targets``)
decide what is written from those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...safetensors_io import TensorInfo

if TYPE_CHECKING:  # the math (and torch) is imported when a projection is processed, not when planning
    from collections.abc import Callable

    import torch

    from .oracle import SourceOracle

    # int8 int4 values [out, in] -> operator words int32 [in, out/8]
    Int4Packer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModuleHeaders:
    """One W4A8 projection's source tensors as the headers show them, with the shape checks done.

    ``group_size`` is 0 without ``weight_scale_second`` (per-channel scales), and where its shape
    gives no group size (a problem the planner reported).
    """

    prefix: str
    proj_name: str  # gate_proj, o_proj...: the last part of the prefix (or of the expert's name)
    sources: dict[str, TensorInfo]  # by role: weight, weight_scale, ..., scale_bias
    out_features: int
    in_features: int
    packed_on_disk: bool  # int8 [out/2, in], two int4 per byte, instead of [out, in]
    per_group: bool  # has weight_scale_second
    group_size: int

    @property
    def where(self) -> str:
        weight = self.sources["weight"]
        return f"{weight.path}: tensor {weight.name}"


class SourceLayout:
    """A source layout. Attributes describe its tensors; no method reads tensor data but the math ones."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what writes it and what it holds
    packed_on_disk: ClassVar[bool]  # weight int8 [out/2, in] (two int4 per byte) instead of [out, in]
    per_group: ClassVar[bool]  # has weight_scale_second [out, in/g]
    stores_scale_bias: ClassVar[bool]  # the checkpoint carries scale_bias (else it is computed from the weight)
    synthetic_linear: ClassVar[bool] = True  # `synthetic` writes W4A8 Linear layers in this layout
    described_by_config: ClassVar[bool] = False  # config.json describes it, not quant_model_description.json
    oracle: ClassVar[SourceOracle]  # verify's independent numpy re-derivation

    def matches(self, module: ModuleHeaders) -> bool:
        """Whether a projection's tensors are in this layout (from shapes and dtypes alone)."""
        return module.packed_on_disk == self.packed_on_disk and module.per_group == self.per_group

    def bias_chunks(self, module: ModuleHeaders, problems: list[str]) -> int | None:
        """The number of input chunks of the module's scale_bias output, or None (problems said why)."""
        raise NotImplementedError

    def check_description(self, description: dict, path: str, problems: list[str]) -> None:
        """Report description keys that contradict this layout (``path`` names the file)."""

    def engine_keys(self, description: dict, group_size: int | None) -> dict:
        """The description keys a serving engine reads for an unconverted checkpoint of this layout
        (the canary's engine runs with them): msModelSlim's top-level scalars."""
        from ..canary import engine_description

        return engine_description(description, group_size)

    # --- the math: torch tensors in, torch tensors out, on any device ---

    def value_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """What in a projection's source values (by role) this layout cannot convert exactly, if anything."""
        return None

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
        """scale_bias as float32 ``[out, num_chunks]``, from the scales a serving target uses."""
        raise NotImplementedError

    # --- synthetic checkpoints ---

    def synthetic_tensors(self, prefix: str, values, weight_scale, weight_scale_second, row_parallel: bool) -> dict:
        """One projection's tensors in this layout, from int4 values int8 ``[out, in]`` and fp32 scales
        (``weight_scale [out, 1]``, ``weight_scale_second [out, in/g]``)."""
        raise NotImplementedError

    def synthetic_w8a8(self, prefix: str, n: int, k: int, random) -> dict:
        """A W8A8_DYNAMIC projection as this layout's tool writes it: msModelSlim's int8 weight, fp32
        ``weight_scale`` and zero ``weight_offset`` ``[out, 1]``; ``random``: a
        :mod:`w4a8conv.synthetic.random_values` source."""
        import torch

        return {
            f"{prefix}.weight": random.int8(n, k),
            f"{prefix}.weight_scale": random.uniform(0.01, 0, n, 1),
            f"{prefix}.weight_offset": torch.zeros(n, 1),
        }

    def synthetic_description(self, group_size: int) -> dict:
        """The top-level description keys this layout's writer puts beside the tensor types (with
        ``described_by_config``: ``config.json``'s ``quantization_config``)."""
        raise NotImplementedError
