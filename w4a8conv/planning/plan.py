"""The conversion plan: one frozen object saying everything a conversion will do, with its JSON form.

``inspect``, ``convert --dry-run``, ``convert`` (with ``--resume`` and job arrays) and ``finalize``
all read a :class:`ConversionPlan`. It is built from headers alone (``planner.build_plan``), saved
as the output directory's ``.w4a8conv/job.json`` before any shard is written, and compared by
:attr:`ConversionPlan.fingerprint` when a conversion is resumed or a job array shares a directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..formats.projection import Projection
from ..formats.sources import get_source
from ..formats.targets import ServingTarget, get_target
from ..names import MANIFEST_FILE, TOOL_SECTION, natural_key
from ..reading.gc_hold import holding_gc
from ..reading.job_file import HEAD, MIDDLE, TAIL, fingerprint_of
from ..safetensors_io import ITEMSIZE, OutputEntry, TensorInfo

PLAN_FORMAT = "w4a8conv-plan/2"  # 2: served_config


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
        served_config: the ``config.json`` written for a compressed-tensors source; None where the
            source's is copied with the extra files.
        problems: every inconsistency found; a conversion refuses to start while any is listed.
        serving_targets: the registered targets that can serve every module (whichever ``target`` is).
        inputs: each input file (relative to ``source``) with what identifies its version, so that a
            resumed conversion of a changed source is refused rather than mixed into one output.
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
    serving_targets: tuple[str, ...] = ()
    inputs: Mapping[str, str] = field(default_factory=dict)
    served_config: Mapping[str, Any] | None = None

    @property
    def serving_target(self) -> ServingTarget:
        return get_target(self.target)

    @property
    def array_size(self) -> int:
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
        return hashlib.sha256(self._canonical()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_json` turns back into this plan.

        Compact, as a DeepSeek-R1 plan holds 44,544 modules and 223,000 source tensors: files and
        layouts by their index in a table, each tensor's name and end implied, each shard's tensor
        list derived again from its pass-through tensors and modules.
        """
        # Tensors of one shard share one Path object: index files by it (Path.name is slow at this scale).
        by_path: dict[int, Path] = {id(i.path): i.path for i in self.passthrough}
        by_path.update((id(i.path), i.path) for m in self.modules for i in m.sources.values())
        files = sorted({path.name for path in by_path.values()})
        file_index = {path_id: files.index(path.name) for path_id, path in by_path.items()}
        layouts = sorted({m.layout.name for m in self.modules})
        layout_index = {name: n for n, name in enumerate(layouts)}

        def tensor(info: TensorInfo) -> list:
            return [file_index[id(info.path)], info.dtype, list(info.shape), info.begin]

        def module(m: Projection) -> list:
            sources = [[role, *tensor(info)] for role, info in m.sources.items()]
            return [
                m.prefix,
                m.is_moe,
                layout_index[m.layout.name],
                m.out_features,
                m.in_features,
                m.group_size,
                m.bias_chunks,
                sources,
            ]

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
            "files": files,
            "layouts": layouts,
            "shards": [
                {
                    "name": shard.name,
                    "file_size": shard.file_size,
                    "passthrough": [[info.name, *tensor(info)] for info in shard.passthrough],
                    "modules": [module(m) for m in shard.modules],
                }
                for shard in self.shards
            ],
            "shares": [list(share) for share in self.shares],
            "description": dict(self.description),
            "problems": list(self.problems),
            "serving_targets": list(self.serving_targets),
            "inputs": dict(self.inputs),
            "served_config": None if self.served_config is None else dict(self.served_config),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> ConversionPlan:
        """The plan :meth:`to_json` gave; ``where`` names the file for a one-line error if it is not one."""
        try:
            if data.get("plan_format") != PLAN_FORMAT:
                raise ValueError(f"plan_format {data.get('plan_format')!r}, expected {PLAN_FORMAT!r}")
            source = Path(data["source"])
            files = [source / _file_name(name) for name in data["files"]]
            layouts = [get_source(name) for name in data["layouts"]]
            target = get_target(data["target"])

            def tensor(name: str, file: int, dtype: str, shape: list, begin: int) -> TensorInfo:
                shape = tuple(int(d) for d in shape)
                return TensorInfo(
                    str(name), files[file], str(dtype), shape, begin, begin + math.prod(shape) * ITEMSIZE[dtype]
                )

            shards = []
            for item in data["shards"]:
                name = _file_name(item["name"])
                passthrough = tuple(tensor(*info) for info in item["passthrough"])
                modules = tuple(
                    Projection(
                        prefix=str(prefix),
                        is_moe=bool(moe),
                        layout=layouts[layout],
                        out_features=int(out),
                        in_features=int(inp),
                        group_size=int(group),
                        bias_chunks=int(chunks),
                        sources={str(role): tensor(f"{prefix}.{role}", *info) for role, *info in sources},
                        shard=name,
                    )
                    for prefix, moe, layout, out, inp, group, chunks, sources in item["modules"]
                )
                entries = shard_entries(passthrough, modules, target)
                shards.append(OutputShard(name, entries, passthrough, modules, int(item["file_size"])))
            return cls(
                source=source,
                source_layout=str(data["source_layout"]),
                target=target.name,
                group_size=data["group_size"],
                params_dtype=str(data["params_dtype"]),
                tool_version=str(data["tool_version"]),
                checksums=bool(data["checksums"]),
                modules=_sorted((m for s in shards for m in s.modules), lambda m: m.prefix),
                passthrough=_sorted((i for s in shards for i in s.passthrough), lambda i: i.name),
                moe_layers=tuple(MoELayer(p, tuple(e), int(h), int(i)) for p, e, h, i in data["moe_layers"]),
                shards=tuple(shards),
                shares=tuple(tuple(_file_name(name) for name in share) for share in data["shares"]),
                extra_files=tuple(_relative_path(rel) for rel in data["extra_files"]),
                index_name=_file_name(data["index_name"]),
                description=dict(data["description"]),
                input_bytes=int(data["input_bytes"]),
                other_quant_types=dict(data["other_quant_types"]),
                problems=tuple(data["problems"]),
                serving_targets=tuple(str(name) for name in data["serving_targets"]),
                inputs={_relative_path(name): str(identity) for name, identity in data["inputs"].items()},
                served_config=None if data["served_config"] is None else dict(data["served_config"]),
            )
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, BadInputError) as e:
            raise BadInputError(f"{where}: not a w4a8conv conversion plan ({type(e).__name__}: {e})") from None

    @holding_gc
    def to_bytes(self) -> bytes:
        """The plan as ``job.json`` holds it: its fingerprint, then its canonical JSON."""
        canonical = self._canonical()
        self.__dict__["fingerprint"] = hashlib.sha256(canonical).hexdigest()  # cached_property's slot
        return HEAD + self.fingerprint.encode() + MIDDLE + canonical + TAIL

    @classmethod
    @holding_gc
    def from_bytes(cls, raw: bytes, where: str) -> ConversionPlan:
        """The plan :meth:`to_bytes` gave, its fingerprint checked; a bad file is one line naming ``where``."""
        fingerprint = fingerprint_of(raw)
        canonical = raw[len(HEAD) + 64 + len(MIDDLE) : -len(TAIL)]
        if fingerprint is None or not raw.endswith(TAIL):
            raise BadInputError(f"{where}: not a w4a8conv conversion plan")
        if hashlib.sha256(canonical).hexdigest() != fingerprint:
            raise BadInputError(f"{where}: its fingerprint does not match its content (edited or corrupt)")
        try:
            data = json.loads(canonical)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadInputError(f"{where}: not valid JSON ({e})") from None
        plan = cls.from_json(data, where)
        plan.__dict__["fingerprint"] = fingerprint
        return plan

    def _canonical(self) -> bytes:
        # Not sort_keys: to_json's order is already fixed, and the description keeps its own order.
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def shard_entries(
    passthrough: tuple[TensorInfo, ...], modules: tuple[Projection, ...], target: ServingTarget
) -> tuple[OutputEntry, ...]:
    """What an output shard holds, in the order its tensors are produced: the copies, then each module's outputs."""
    entries = [OutputEntry(info.name, info.dtype, info.shape) for info in passthrough]
    for module in modules:
        entries.extend(target.outputs(module))
    return tuple(entries)


def _sorted(items, name) -> tuple:
    return tuple(sorted(items, key=lambda item: natural_key(name(item))))


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
