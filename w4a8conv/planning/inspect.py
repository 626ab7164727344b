"""``w4a8conv inspect``: what a checkpoint is and what is wrong with it, from headers alone.

A source checkpoint is described by its conversion plan (``planner``), a w4a8conv output by its
description's processed tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..experts import describe_naming, parse_expert
from ..formats.targets import DEFAULT_TARGET
from ..names import (
    DESCRIPTION_FILE,
    PREPACKED_TYPE,
    PROCESSED_FORMAT,
    TOOL_SECTION,
    W4A8_TYPE,
    tensor_entries,
)
from ..reading.checkpoint import Checkpoint, open_checkpoint
from .planner import build_plan


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect`` found; ``as_dict`` is its ``--json`` form."""

    path: str
    format: str  # the source layout, ``processed`` for w4a8conv output, or ``unknown``
    target: str | None  # checked against (a source), or made for (a w4a8conv output)
    serving_targets: list[str]  # the registered targets that can serve a source (empty for an output)
    convert_with: str | None  # the --target to pass to convert a source (None: none serves it, or an output)
    contract: dict  # a w4a8conv output's artifact contract, as its description records it (empty for a source)
    version: str | None
    group_size: int | None
    modules: int
    w4a8_linear: int
    moe_layers: int
    experts: int
    experts_per_layer: int | list[int]
    experts_naming: str | None  # e.g. "w1/w2/w3, DeepSeek-V4 naming, MTP layer included"
    hidden_size: int | None
    moe_intermediate_size: int | None
    other_quant_types: dict[str, int]
    params_dtype: str
    shards: int
    tensors: int
    input_bytes: int  # the inspected checkpoint's shard bytes
    output_bytes: int | None  # after convert (a source); None for a w4a8conv output
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # what a reader should know that is no problem
    not_checked: list[str] = field(default_factory=list)  # what convert checks and inspect does not

    def as_dict(self) -> dict:
        """``in_dir`` for the path, as every command's JSON names its input."""
        fields = asdict(self)
        return {"ok": not self.problems, "in_dir": fields.pop("path"), **fields}


# convert (and --dry-run) read every W4A8 scale and refuse NaN or Inf; inspect reads headers only.
NOT_CHECKED = ["the W4A8 scales' values (NaN, Inf): `w4a8conv convert --dry-run` reads them, as convert does"]


def inspect_checkpoint(path: Path | str, target: str | None = None) -> InspectReport:
    """Describe a checkpoint from its description, index and safetensors headers (no tensor data).

    Args:
        path: the checkpoint directory.
        target: the serving target a source checkpoint is checked against, or a w4a8conv output is
            expected to be made for. None: a source is checked against the default target, or, where
            that cannot serve it, the newest one that can (a note says so).

    Returns:
        The report; ``problems`` lists every inconsistency found, one line each.

    Raises:
        BadInputError: when the directory cannot be read as a checkpoint at all.
    """
    ckpt = open_checkpoint(Path(path))
    if TOOL_SECTION in ckpt.description:
        report = InspectReport(**_common(path, ckpt), **_processed(ckpt))
        if target is not None and report.target != target:
            report.problems.append(
                f"{path}: converted for --target {report.target}, not {target}; convert its source again with "
                f"--target {target}"
            )
        return report
    plan = build_plan(ckpt, target or DEFAULT_TARGET)
    notes = []
    convert_with = plan.target if not plan.problems else None
    if plan.problems and plan.serving_targets and plan.serving_targets[-1] != plan.target:
        other = build_plan(ckpt, plan.serving_targets[-1])
        if not other.problems:
            convert_with = other.target
            if target is None:
                plan = other
                notes.append(
                    f"the default target {DEFAULT_TARGET} does not serve it: convert with --target {plan.target}"
                )
    experts_per_layer = sorted({len(layer.experts) for layer in plan.moe_layers})
    moe_shapes = {(layer.hidden_size, layer.intermediate_size) for layer in plan.moe_layers}
    hidden, intermediate = moe_shapes.pop() if len(moe_shapes) == 1 else (None, None)
    summary = plan.summary
    return InspectReport(
        **_common(path, ckpt),
        format=plan.source_layout,
        target=plan.target,
        serving_targets=list(plan.serving_targets),
        convert_with=convert_with,
        contract={},
        group_size=plan.group_size,
        modules=summary.modules,
        w4a8_linear=sum(not p.is_moe for p in plan.modules),
        moe_layers=summary.moe_layers,
        experts=summary.experts,
        experts_per_layer=experts_per_layer[0] if len(experts_per_layer) == 1 else experts_per_layer,
        experts_naming=describe_naming(
            [layer.prefix for layer in plan.moe_layers],
            {parse_expert(p.prefix).naming for p in plan.modules if p.is_moe},
            _decoder_layers(ckpt),
        ),
        hidden_size=hidden or None,
        moe_intermediate_size=intermediate or None,
        other_quant_types=dict(plan.other_quant_types),
        output_bytes=summary.output_bytes if plan.modules else None,
        problems=list(plan.problems),
        notes=notes,
        not_checked=NOT_CHECKED if plan.modules else [],
    )


CONTRACT_KEYS = (
    "format_version",
    "target",
    "engine",
    "engine_releases",
    "upstream",
    "source_layout",
    "params_dtype",
    "scale_bias_chunks",
)


def _canary_summary(section: dict) -> dict:
    """The canary's record in one line: which expert and Linear, its file and digest."""
    canary = section.get("canary")
    if not isinstance(canary, dict):
        return {}
    held = [f"expert {canary.get('expert')} of {canary.get('moe_layer')}"] if canary.get("moe_layer") else []
    held += [f"Linear {canary['linear']}"] if canary.get("linear") else []
    digest = str(canary.get("sha256", ""))[:16]
    return {"canary": f"{canary.get('file')}: {', '.join(held)} (sha256 {digest}...)"}


def _decoder_layers(ckpt: Checkpoint) -> int | None:
    """config.json's decoder layer count (an MoE layer numbered past it is an MTP layer), if it says."""
    config = ckpt.config if isinstance(ckpt.config, dict) else {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("num_hidden_layers")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def _common(path: Path | str, ckpt: Checkpoint) -> dict:
    return {
        "path": str(path),
        "version": ckpt.description.get("version"),
        "params_dtype": ckpt.params_dtype_name
        + (f" (assumed: {ckpt.dtype_assumed}; convert --dtype sets it)" if ckpt.dtype_assumed else ""),
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "input_bytes": ckpt.total_bytes,
    }


def _processed(ckpt: Checkpoint) -> dict:
    """A w4a8conv output: its processed modules (it converts nothing)."""
    section = ckpt.description.get(TOOL_SECTION) or {}
    types = tensor_entries(ckpt.description, ckpt.tensors)
    problems: list[str] = []
    layers: dict[str, set[int]] = {}
    namings = set()
    modules = linear = 0
    other: dict[str, int] = {}
    for name, quant_type in types.items():
        if not name.endswith(".weight"):
            continue
        if quant_type not in (W4A8_TYPE, PREPACKED_TYPE):
            other[quant_type] = other.get(quant_type, 0) + 1
        if quant_type != PREPACKED_TYPE:
            continue
        modules += 1
        if name not in ckpt.tensors:
            problems.append(f"{ckpt.root / DESCRIPTION_FILE}: lists tensor {name}, which no shard holds")
        expert = parse_expert(name[: -len(".weight")])
        if expert is not None:
            layers.setdefault(expert.layer, set()).add(expert.expert)
            namings.add(expert.naming)
        else:
            linear += 1
    if not modules:
        problems.append(f"{ckpt.root}: processed checkpoint lists no {PREPACKED_TYPE} weight")
    experts_per_layer = sorted({len(experts) for experts in layers.values()})
    return {
        "format": PROCESSED_FORMAT,
        "target": section.get("target"),
        "serving_targets": [],
        "convert_with": None,
        "contract": {key: section[key] for key in CONTRACT_KEYS if key in section} | _canary_summary(section),
        "group_size": section.get("group_size"),
        "modules": modules,
        "w4a8_linear": linear,
        "moe_layers": len(layers),
        "experts": sum(len(experts) for experts in layers.values()),
        "experts_per_layer": experts_per_layer[0] if len(experts_per_layer) == 1 else experts_per_layer,
        "experts_naming": describe_naming(sorted(layers), namings, _decoder_layers(ckpt)),
        "hidden_size": None,
        "moe_intermediate_size": None,
        "other_quant_types": dict(sorted(other.items())),
        "output_bytes": None,
        "problems": problems,
    }
