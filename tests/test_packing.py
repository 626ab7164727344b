"""Int4 packing: golden words computed by hand, round trips, and the two on-disk layouts agreeing."""

from __future__ import annotations

import pytest
import torch

from w4a8conv.formats.packing import (
    int4_pair_rows_to_int32_words,
    int4_range_violation,
    pack_int4_pairs_along_rows,
    pack_int4_to_int32,
    unpack_int4_pairs_along_rows,
    unpack_int32_words,
)
from w4a8conv.formats.sources.v1_per_group import pack_pairs


def test_pack_pairs_golden_bytes():
    # byte = (w[2i] & 0xF) | (w[2i+1] << 4): rows (1, 2) -> 0x21; (-1, 0) -> 0x0F; (-8, 7) -> 0x78; (0, -1) -> 0xF0
    values = torch.tensor([[1, -1, -8, 0], [2, 0, 7, -1]], dtype=torch.int8)
    packed = pack_int4_pairs_along_rows(values)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x0F, 0x78, 0xF0]]


def test_pack_to_int32_golden_word():
    # One output row of 8 values along "out" for a single input column: [out=8, in=1].
    # Element 8m+j in bits 4j..4j+3: nibbles 1,2,3,4,5,6,7,-8 -> 0x87654321 read as signed int32.
    values = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [-8]], dtype=torch.int8)
    words = pack_int4_to_int32(values)
    assert words.shape == (1, 1)
    assert words.item() == 0x87654321 - 2**32
    # All -1 nibbles give 0xFFFFFFFF = -1; all zeros give 0.
    assert pack_int4_to_int32(torch.full((8, 1), -1, dtype=torch.int8)).item() == -1
    assert pack_int4_to_int32(torch.zeros(8, 1, dtype=torch.int8)).item() == 0


def test_pack_to_int32_orientation_transposes():
    # [out=16, in=3] -> [in=3, out/8=2]; column k of the input becomes row k of the words.
    values = torch.zeros(16, 3, dtype=torch.int8)
    values[9, 2] = 5  # out row 9 = word 1, nibble 1 of input row 2
    words = pack_int4_to_int32(values)
    assert words.shape == (3, 2)
    assert words.tolist() == [[0, 0], [0, 0], [0, 5 << 4]]


def test_round_trips_every_int4_value():
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(-8, 8, (3, 64, 40), generator=gen, dtype=torch.int8)  # a stack of experts
    assert torch.equal(unpack_int4_pairs_along_rows(pack_int4_pairs_along_rows(values)), values)
    words = pack_int4_to_int32(values)
    assert words.shape == (3, 40, 8) and words.dtype == torch.int32
    assert torch.equal(unpack_int32_words(words), values)


def test_mindie_and_v1_bytes_give_identical_words():
    gen = torch.Generator().manual_seed(2)
    values = torch.randint(-8, 8, (32, 24), generator=gen, dtype=torch.int8)
    v1_bytes = pack_pairs(values)  # independent encoder
    assert torch.equal(pack_int4_pairs_along_rows(values), v1_bytes)
    assert torch.equal(int4_pair_rows_to_int32_words(v1_bytes), pack_int4_to_int32(values))


def test_range_violation_and_divisibility():
    assert int4_range_violation(torch.tensor([-8, 7], dtype=torch.int8)) is None
    assert int4_range_violation(torch.tensor([-9, 3], dtype=torch.int8)) == (-9, 3)
    assert int4_range_violation(torch.tensor([0, 8], dtype=torch.int8)) == (0, 8)
    with pytest.raises(ValueError, match="not divisible by 8"):
        int4_pair_rows_to_int32_words(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="odd"):
        pack_int4_pairs_along_rows(torch.zeros(3, 4, dtype=torch.int8))
