"""Old msModelSlim output ("mindie"): one int4 per int8 byte, per-group scales, no scale_bias.

On disk per projection: ``weight`` int8 ``[out, in]`` holding -8..7, ``weight_scale [out, 1]``,
``weight_offset [out, 1]``, ``weight_scale_second [out, in/g]``, ``weight_offset_second``. The
description usually has no ``version`` and no ``group_size``. The scale_bias is computed here.
"""

from __future__ import annotations

import numpy as np

from ...errors import BadInputError
from ...names import ROW_PARALLEL, SCALE_BIAS_CHUNKS
from .base import ModuleHeaders, SourceLayout
from .oracle import SourceArrays, SourceOracle, recomputed_scale_bias, words_from_rows


class MindieOracle(SourceOracle):
    scale_bias_origin = "8 * sum(w * s) recomputed in float64"

    def int4_values(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        return raw.astype(np.int16)

    def operator_words(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        return words_from_rows(raw, out_features, values_per_byte=1)

    def weight_problem(self, raw: np.ndarray) -> str | None:
        if raw.size and (raw.min() < -8 or raw.max() > 7):
            return "values outside the int4 range -8..7"
        return None

    def expected_scale_bias(self, arrays: SourceArrays, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        values = self.int4_values(arrays.raw, arrays.out_features)
        return recomputed_scale_bias(values, arrays.scale, arrays.second, chunks)


class MindieLayout(SourceLayout):
    name = "mindie"
    summary = "old msModelSlim output: int8 [out, in] one int4 per byte, per-group scales, no scale_bias"
    packed_on_disk = False
    per_group = True
    stores_scale_bias = False
    oracle = MindieOracle()

    def bias_chunks(self, module: ModuleHeaders, problems: list[str]) -> int | None:
        stored = module.sources.get("scale_bias")
        if stored is not None:
            problems.append(f"{stored.path}: tensor {stored.name}: a {self.name} checkpoint has no scale_bias")
        # Computed here: 16 chunks for row-parallel projections, as msModelSlim 1.0.0 stores them.
        row_parallel = module.proj_name in ROW_PARALLEL and module.in_features % SCALE_BIAS_CHUNKS == 0
        return SCALE_BIAS_CHUNKS if row_parallel else 1

    def check_description(self, description: dict, path: str, problems: list[str]) -> None:
        if description.get("version") == "1.0.0":
            problems.append(f"{path}: version is '1.0.0' but the weights hold one int4 per byte, as in mindie output")

    def operator_words(self, weight, where, pack_int4):
        from ..packing import int4_range_violation

        violation = int4_range_violation(weight)
        if violation is not None:
            raise BadInputError(f"{where}: int4 weight holds values {violation[0]}..{violation[1]}, outside -8..7")
        return pack_int4(weight)

    def scale_bias(self, weight, weight_scale, weight_scale_second, stored, num_chunks):
        from ..scales import scale_bias_chunks

        return scale_bias_chunks(weight, weight_scale, weight_scale_second, num_chunks)

    def synthetic_tensors(self, prefix, values, weight_scale, weight_scale_second, row_parallel):
        import torch

        return {
            f"{prefix}.weight": values.clone(),
            f"{prefix}.weight_scale": weight_scale.clone(),
            f"{prefix}.weight_offset": torch.zeros(values.shape[0], 1),
            f"{prefix}.weight_scale_second": weight_scale_second.clone(),
            f"{prefix}.weight_offset_second": torch.zeros(weight_scale_second.shape, dtype=torch.int64),
        }

    def synthetic_description(self, group_size: int) -> dict:
        return {}  # mindie output usually has neither version nor group_size
