"""The conversion plan: one frozen object saying everything a conversion will do, with its JSON form.

``inspect``, ``convert --dry-run``, ``convert`` (with ``--resume`` and job arrays) and ``finalize``
all read a :class:`ConversionPlan`. It is built from headers alone (``planner.build_plan``), saved
as the output directory's ``.w4a8conv/job.json`` before any shard is written, and compared by
:attr:`ConversionPlan.fingerprint` when a conversion is resumed or a job array shares a directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import BadInputError
from .names import MANIFEST_FILE, TOOL_SECTION, natural_key
from .safetensors_io import OutputEntry, TensorInfo
from .sources import SourceLayout, get_source
from .targets import ServingTarget, get_target

PLAN_FORMAT = "w4a8conv-plan/1"


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


@dataclass(frozen=True)
class MoELayer:
    prefix: str
    experts: tuple[int, ...]
    hidden_size: int
    intermediate_size: int


@dataclass(frozen=True)
class OutputShard:
    """One output file, the tensors it holds and the work that fills it."""

    name: str
    entries: tuple[OutputEntry, ...]
    passthrough: tuple[TensorInfo, ...]
    modules: tuple[Projection, ...]
    file_size: int  # header included

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class PlanSummary:
    format: str
    group_size: int | None
    modules: int
    moe_layers: int
    experts: int
    shards: int
    input_bytes: int
    output_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a conversion of ``source`` for ``target`` does, fixed before a byte is written.

    Attributes:
        source: the source directory (resolved).
        source_layout: the layout name, or ``unknown`` when the plan has problems that hide it.
        target: the serving target's name.
        modules: the W4A8 projections to process, in natural name order.
        passthrough: tensors copied verbatim, in natural name order.
        shards: the output files, in name order.
        shares: the shard names of each job of an array (one share without an array).
        extra_files: files copied beside the shards (config, tokenizer...), relative to the source.
        description: the processed ``quant_model_description.json``, written last.
        problems: every inconsistency found; a conversion refuses to start while any is listed.
    """

    source: Path
    source_layout: str
    target: str
    group_size: int | None
    params_dtype: str
    tool_version: str
    checksums: bool
    modules: tuple[Projection, ...]
    passthrough: tuple[TensorInfo, ...]
    moe_layers: tuple[MoELayer, ...]
    shards: tuple[OutputShard, ...]
    shares: tuple[tuple[str, ...], ...]
    extra_files: tuple[str, ...]
    index_name: str
    description: Mapping[str, Any]
    input_bytes: int
    other_quant_types: Mapping[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def serving_target(self) -> ServingTarget:
        return get_target(self.target)

    @property
    def num_workers(self) -> int:
        return len(self.shares)

    @property
    def output_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def summary(self) -> PlanSummary:
        return PlanSummary(
            format=self.source_layout,
            group_size=self.group_size,
            modules=len(self.modules),
            moe_layers=len(self.moe_layers),
            experts=sum(len(layer.experts) for layer in self.moe_layers),
            shards=len(self.shards),
            input_bytes=self.input_bytes,
            output_bytes=self.output_bytes,
        )

    @property
    def index(self) -> dict[str, Any]:
        """The output's Hugging Face index."""
        weight_map = ((e.name, shard.name) for shard in self.shards for e in shard.entries)
        return {
            "metadata": {"total_size": self.output_bytes},
            "weight_map": dict(sorted(weight_map, key=lambda kv: natural_key(kv[0]))),
        }

    def shard(self, name: str) -> OutputShard:
        return next(shard for shard in self.shards if shard.name == name)

    def with_checksums(self, checksums: bool) -> ConversionPlan:
        """The same plan with or without the checksum manifest (the description names it or not)."""
        description = dict(self.description)
        description[TOOL_SECTION] = {
            **description[TOOL_SECTION],
            "checksum_manifest": MANIFEST_FILE if checksums else None,
        }
        return replace(self, checksums=checksums, description=description)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the plan's canonical JSON: equal fingerprints, equal conversions."""
        canonical = json.dumps(self._json_body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_json` turns back into this plan."""
        return {**self._json_body(), "fingerprint": self.fingerprint}

    def _json_body(self) -> dict[str, Any]:
        return {
            "plan_format": PLAN_FORMAT,
            "tool_version": self.tool_version,
            "source": str(self.source),
            "source_layout": self.source_layout,
            "target": self.target,
            "group_size": self.group_size,
            "params_dtype": self.params_dtype,
            "checksums": self.checksums,
            "input_bytes": self.input_bytes,
            "extra_files": list(self.extra_files),
            "index_name": self.index_name,
            "other_quant_types": dict(self.other_quant_types),
            "moe_layers": [[m.prefix, list(m.experts), m.hidden_size, m.intermediate_size] for m in self.moe_layers],
            "shards": [_shard_json(shard) for shard in self.shards],
            "shares": [list(share) for share in self.shares],
            "description": dict(self.description),
            "problems": list(self.problems),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> ConversionPlan:
        """The plan :meth:`to_json` gave; ``where`` names the file for a one-line error if it is not one."""
        try:
            if data.get("plan_format") != PLAN_FORMAT:
                raise ValueError(f"plan_format {data.get('plan_format')!r}, expected {PLAN_FORMAT!r}")
            source = Path(data["source"])
            shards = tuple(_shard_from_json(item, source) for item in data["shards"])
            plan = cls(
                source=source,
                source_layout=str(data["source_layout"]),
                target=str(data["target"]),
                group_size=data["group_size"],
                params_dtype=str(data["params_dtype"]),
                tool_version=str(data["tool_version"]),
                checksums=bool(data["checksums"]),
                modules=tuple(sorted((m for s in shards for m in s.modules), key=lambda m: natural_key(m.prefix))),
                passthrough=tuple(
                    sorted((i for s in shards for i in s.passthrough), key=lambda i: natural_key(i.name))
                ),
                moe_layers=tuple(MoELayer(p, tuple(e), int(h), int(i)) for p, e, h, i in data["moe_layers"]),
                shards=shards,
                shares=tuple(tuple(_file_name(name) for name in share) for share in data["shares"]),
                extra_files=tuple(_relative_path(rel) for rel in data["extra_files"]),
                index_name=_file_name(data["index_name"]),
                description=dict(data["description"]),
                input_bytes=int(data["input_bytes"]),
                other_quant_types=dict(data["other_quant_types"]),
                problems=tuple(data["problems"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError, BadInputError) as e:
            raise BadInputError(f"{where}: not a w4a8conv conversion plan ({type(e).__name__}: {e})") from None
        if data.get("fingerprint") != plan.fingerprint:
            raise BadInputError(f"{where}: its fingerprint does not match its content (edited or corrupt)")
        return plan


def _info_json(info: TensorInfo) -> list:
    # Shards lie directly in the source directory (an index names files, never paths).
    return [info.name, info.path.name, info.dtype, list(info.shape), info.begin, info.end]


def _file_name(value: Any) -> str:
    """A file name read back from a plan: one plain name, never a path that could lead out of a directory."""
    if not isinstance(value, str) or Path(value).name != value or value in ("", ".", ".."):
        raise ValueError(f"{value!r} is not a plain file name")
    return value


def _relative_path(value: Any) -> str:
    """A path read back from a plan, inside its directory (no absolute path, no ``..``)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise ValueError(f"{value!r} is not a path inside the directory")
    return value


def _info_from_json(item: list, source: Path) -> TensorInfo:
    name, file_name, dtype, shape, begin, end = item
    shape = tuple(int(d) for d in shape)
    return TensorInfo(str(name), source / _file_name(file_name), str(dtype), shape, int(begin), int(end))


def _shard_json(shard: OutputShard) -> dict[str, Any]:
    return {
        "name": shard.name,
        "file_size": shard.file_size,
        "entries": [[e.name, e.dtype, list(e.shape)] for e in shard.entries],
        "passthrough": [_info_json(info) for info in shard.passthrough],
        "modules": [
            {
                "prefix": m.prefix,
                "moe": m.is_moe,
                "layout": m.layout.name,
                "out": m.out_features,
                "in": m.in_features,
                "group_size": m.group_size,
                "chunks": m.bias_chunks,
                "sources": {role: _info_json(info) for role, info in m.sources.items()},
            }
            for m in shard.modules
        ],
    }


def _shard_from_json(item: dict, source: Path) -> OutputShard:
    name = _file_name(item["name"])
    modules = tuple(
        Projection(
            prefix=str(m["prefix"]),
            is_moe=bool(m["moe"]),
            layout=get_source(m["layout"]),
            out_features=int(m["out"]),
            in_features=int(m["in"]),
            group_size=int(m["group_size"]),
            bias_chunks=int(m["chunks"]),
            sources={str(role): _info_from_json(info, source) for role, info in m["sources"].items()},
            shard=name,
        )
        for m in item["modules"]
    )
    return OutputShard(
        name=name,
        entries=tuple(OutputEntry(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in item["entries"]),
        passthrough=tuple(_info_from_json(info, source) for info in item["passthrough"]),
        modules=modules,
        file_size=int(item["file_size"]),
    )
