"""Shared fixtures: one synthetic checkpoint per layout, and its conversion, built once per session."""

from __future__ import annotations

import pytest

from w4a8conv.convert import convert_checkpoint
from w4a8conv.synthetic import LAYOUT_NAMES, SyntheticSpec, write_checkpoint

SPEC = SyntheticSpec()


@pytest.fixture(scope="session")
def source_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    return {layout: write_checkpoint(root / layout, layout, SPEC) for layout in LAYOUT_NAMES}


@pytest.fixture(scope="session")
def converted_checkpoints(source_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("converted")
    return {layout: convert_checkpoint(src, root / layout).out_dir for layout, src in source_checkpoints.items()}


@pytest.fixture(params=LAYOUT_NAMES)
def layout(request) -> str:
    return request.param
