"""msModelSlim 1.0.0 with ``group_size > 0``: two int4 per byte, per-group scales, a stored scale_bias.

On disk per projection: ``weight`` int8 ``[out/2, in]`` with ``byte[i, k] = (w[2i, k] & 0xF) |
(w[2i+1, k] << 4)``, ``weight_scale [out, 1]``, ``weight_offset``, ``weight_scale_second [out, in/g]``,
``weight_offset_second`` and ``scale_bias [out, chunks]`` (16 input chunks for row-parallel
projections, else 1), which msModelSlim computes from bf16-rounded scales. Description: ``version``
"1.0.0" and ``group_size``.
"""

from __future__ import annotations

import numpy as np

from .base import ModuleHeaders, SourceLayout
from .oracle import SourceArrays, SourceOracle, signed_nibble, words_from_rows


class V1Oracle(SourceOracle):
    scale_bias_origin = "the stored scale_bias"

    def int4_values(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        values = np.empty((out_features, raw.shape[1]), dtype=np.int16)
        values[0::2] = signed_nibble(raw.view(np.uint8), 0)  # even rows in the low nibble
        values[1::2] = signed_nibble(raw.view(np.uint8), 1)
        return values

    def operator_words(self, raw: np.ndarray, out_features: int) -> np.ndarray:
        return words_from_rows(raw, out_features, values_per_byte=2)

    def expected_scale_bias(self, arrays: SourceArrays, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        # The stored values, exactly (msModelSlim's own; not recomputed).
        stored = arrays.stored_bias.astype(np.float32)
        if stored.size == arrays.out_features * chunks:
            stored = stored.reshape(arrays.out_features, chunks)
        return stored, np.zeros(stored.shape, dtype=np.float32)


def pack_pairs(values):
    """1.0.0 on disk: ``byte[i, k] = (w[2i, k] & 0xF) | (w[2i+1, k] << 4)``, from an int8 tensor of -8..7
    (a meta tensor gives the packed shape)."""
    import torch

    if values.is_meta:  # elementwise ops on meta tensors first import torch's Python decompositions: 1.4 s
        return torch.empty((values.shape[0] // 2, values.shape[1]), dtype=torch.int8, device="meta")
    nibbles = values.view(torch.uint8)
    return ((nibbles[0::2] & 0x0F) | (nibbles[1::2] << 4)).view(torch.int8)


def msmodelslim_scale_bias(values, weight_scale, weight_scale_second, row_parallel: bool):
    """scale_bias as msModelSlim stores it: from bf16-rounded scales, fp32, 16 chunks if row-parallel.

    Computed a block of rows at a time: the fp32 products of a whole expert would be gigabytes, and each
    row's sums are the same either way."""
    import torch

    n, k = values.shape
    chunks = 16 if row_parallel else 1
    if values.is_meta:  # a shape-only build (see pack_pairs)
        return torch.empty((n, chunks), device="meta")
    s1 = weight_scale.to(torch.bfloat16).float()
    s2 = None
    if weight_scale_second is not None:
        g = k // weight_scale_second.shape[1]
        s2 = weight_scale_second.to(torch.bfloat16).float()
    blocks = []
    for start in range(0, n, _SCALE_BIAS_ROWS):
        rows = slice(start, start + _SCALE_BIAS_ROWS)
        terms = values[rows].float()
        if s2 is not None:
            terms = terms * s2[rows].repeat_interleave(g, dim=1)
        terms = terms * s1[rows]
        blocks.append(8 * terms.reshape(-1, chunks, k // chunks).sum(-1))
    return torch.cat(blocks) if blocks else torch.zeros(0, chunks, device=values.device)


_SCALE_BIAS_ROWS = 64


class V1PerGroupLayout(SourceLayout):
    name = "v1.0.0-per-group"
    summary = "msModelSlim 1.0.0, group_size > 0: int8 [out/2, in] two int4 per byte, per-group scales, scale_bias"
    packed_on_disk = True
    per_group = True
    stores_scale_bias = True
    oracle = V1Oracle()

    def bias_chunks(self, module: ModuleHeaders, problems: list[str]) -> int | None:
        stored = module.sources.get("scale_bias")
        if stored is None:
            problems.append(f"{module.where}: missing {module.prefix}.scale_bias, which the {self.name} layout carries")
            return None
        chunks = {1: 1, 2: stored.shape[-1]}.get(len(stored.shape), 0)
        if chunks == 0 or stored.shape[0] != module.out_features or module.in_features % chunks:
            problems.append(
                f"{stored.path}: tensor {stored.name}: shape {list(stored.shape)} is not "
                f"[{module.out_features}, chunks] with chunks dividing {module.in_features}"
            )
            return None
        return chunks

    def check_description(self, description: dict, path: str, problems: list[str]) -> None:
        version = description.get("version")
        if version != "1.0.0":
            problems.append(
                f"{path}: version is {version!r} but the weights are packed two int4 per byte, as in 1.0.0 "
                "(vllm-ascend would misread them)"
            )

    def operator_words(self, weight, where, pack_int4):
        from ..packing import int4_pair_rows_to_int32_words

        return int4_pair_rows_to_int32_words(weight)

    def scale_bias(self, weight, weight_scale, weight_scale_second, stored, num_chunks):
        import torch

        assert stored is not None
        return stored.to(torch.float32).reshape(stored.shape[0], num_chunks)

    def synthetic_tensors(self, prefix, values, weight_scale, weight_scale_second, row_parallel):
        import torch

        second = weight_scale_second if self.per_group else None
        tensors = {
            f"{prefix}.weight": pack_pairs(values),
            f"{prefix}.weight_scale": weight_scale.clone(),
            f"{prefix}.weight_offset": torch.zeros(values.shape[0], 1),
        }
        if second is not None:
            tensors[f"{prefix}.weight_scale_second"] = second.clone()
            tensors[f"{prefix}.weight_offset_second"] = torch.zeros(second.shape, dtype=torch.int64)
        tensors[f"{prefix}.scale_bias"] = msmodelslim_scale_bias(values, weight_scale, second, row_parallel)
        return tensors

    def synthetic_description(self, group_size: int) -> dict:
        return {"version": "1.0.0", "group_size": group_size if self.per_group else 0}
