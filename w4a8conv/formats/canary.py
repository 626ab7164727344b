"""The canary: the source tensors of one representative W4A8 MoE expert (and of one W4A8 Linear), kept
beside a processed checkpoint byte for byte, so that a server can run its own engine's processing on
them and compare with what the checkpoint holds (:mod:`w4a8conv.serving.vllm_plugin.canary_check`).

The file is a safetensors file named :data:`~w4a8conv.names.CANARY_FILE`: the index does not name it
and its name does not end in ``.safetensors``, so no loader takes it for weights. Its tensors keep the
source's names, dtypes, shapes and bytes (a compressed-tensors source keeps its own form). The plan
records which layer, expert and Linear it holds and the description the engine would read for the
unconverted checkpoint; :func:`~w4a8conv.converting.jobs.finalize` adds the file's sha256 to that record.

Nothing here knows about int4: the bytes are copied, not interpreted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..experts import parse_expert
from ..names import CANARY_FILE, ROW_PARALLEL, natural_key, tensor_entries
from ..safetensors_io import OutputEntry, TensorInfo, layout_header

CANARY_METADATA = {"format": "pt", "w4a8conv": "canary: source tensors, not weights to load"}
_SCALAR = (str, int, float, bool, type(None))


def engine_description(description: Mapping[str, Any], group_size: int | None) -> dict[str, Any]:
    """The description keys an engine reads for the unconverted checkpoint: the source's top-level
    scalars, with the group size its scale shapes give (users of the old API add it by hand)."""
    per_tensor = tensor_entries(dict(description))  # once: per key it made planning quadratic in the tensors
    kept = {k: v for k, v in description.items() if k not in per_tensor and isinstance(v, _SCALAR)}
    if group_size is not None:
        kept["group_size"] = group_size
    return dict(sorted(kept.items()))


def canary_spec(modules: Iterable, engine_keys: Mapping[str, Any]) -> dict[str, Any] | None:
    """Which projections the canary holds: the first MoE layer's lowest-numbered expert, and a W4A8
    Linear (row-parallel first: a plain RowParallelLinear in every vLLM model), or None without W4A8.

    ``modules``: the plan's projections, in plan order.
    """
    modules = list(modules)
    experts = [(m, parse_expert(m.prefix)) for m in modules if m.is_moe]
    linears = [m for m in modules if not m.is_moe]
    if not experts and not linears:
        return None
    spec: dict[str, Any] = {"file": CANARY_FILE, "moe_layer": None, "expert": None, "linear": None}
    tensors: list[str] = []
    if experts:
        first_layer = min((name.layer for _, name in experts), key=natural_key)
        expert = min(name.expert for _, name in experts if name.layer == first_layer)
        spec["moe_layer"], spec["expert"] = first_layer, expert
        tensors += [
            info.name
            for m, name in experts
            if name.layer == first_layer and name.expert == expert
            for info in m.sources.values()
        ]
    if linears:
        row = [m for m in linears if m.prefix.rsplit(".", 1)[-1] in ROW_PARALLEL]
        chosen = (row or linears)[0]
        spec["linear"] = chosen.prefix
        tensors += [info.name for info in chosen.sources.values()]
    spec["tensors"] = sorted(tensors, key=natural_key)
    spec["engine_description"] = dict(engine_keys)
    return spec


def canary_sources(modules: Iterable, spec: Mapping[str, Any]) -> list[TensorInfo]:
    """The source tensors ``spec`` names, where the plan's projections found them."""
    by_name = {info.name: info for m in modules for info in m.sources.values()}
    return [by_name[name] for name in spec["tensors"]]


def canary_chunks(sources: list[TensorInfo], block: int = 16 << 20) -> Iterator[bytes]:
    """The canary file in pieces: a safetensors header for the tensors, then each one's source bytes
    unchanged, read ``block`` bytes at a time (memory stays flat in the expert's size)."""
    header, ranges = layout_header([OutputEntry(i.name, i.dtype, i.shape) for i in sources], CANARY_METADATA)
    by_name = {info.name: info for info in sources}
    yield header
    for name in sorted(ranges, key=lambda n: ranges[n][0]):
        info = by_name[name]
        with open(info.path, "rb") as f:
            for at in range(info.begin, info.end, block):
                data = os.pread(f.fileno(), min(block, info.end - at), at)
                if not data:
                    raise OSError(f"{info.path}: tensor {info.name} is cut short")
                yield data


def with_digest(description: Mapping[str, Any], section_key: str, digest: str) -> dict[str, Any]:
    """``description`` with the canary's sha256 in its record (finalize writes it; verify expects it)."""
    section = dict(description[section_key])
    section["canary"] = {**section["canary"], "sha256": digest}
    return {**description, section_key: section}


def without_digest(description: Mapping[str, Any], section_key: str) -> dict[str, Any]:
    """``description`` as planned: its canary record without the sha256 finalize added."""
    section = description.get(section_key)
    if not isinstance(section, dict) or not isinstance(section.get("canary"), dict):
        return dict(description)
    canary = {k: v for k, v in section["canary"].items() if k != "sha256"}
    return {**description, section_key: {**section, "canary": canary}}


def digest_of(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def canary_path(root: Path, spec: Mapping[str, Any]) -> Path:
    return root / spec.get("file", CANARY_FILE)
