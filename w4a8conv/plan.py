"""Planning a conversion from headers alone: which tensors form each W4A8 projection, what it becomes,
and which output shard holds what.

``inspect``, ``convert`` and the checks before any byte is written all read this one plan. A plan
never raises on a bad checkpoint; it collects every problem it finds so ``inspect`` can list them all.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .layouts import (
    PREPACKED_TYPE,
    PROCESSED_FORMAT,
    W4A8_TYPE,
    SourceLayout,
    layout_from_evidence,
)
from .safetensors_io import OutputEntry, TensorInfo

TOOL_SECTION = "w4a8conv"
MOE_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Row-parallel projections: tensor parallelism splits their input dim, so scale_bias keeps chunks.
ROW_PARALLEL = frozenset({"down_proj", "o_proj", "out_proj", "dense_4h_to_h", "wo"})
SCALE_BIAS_CHUNKS = 16  # msModelSlim's chunk count; vllm-ascend allows MoE tp up to 16 for it
SOURCE_ROLES = ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias")


@functools.lru_cache(maxsize=1 << 20)  # the same names are sorted several times per plan
def natural_key(name: str) -> tuple:
    """Sort ``layers.10`` after ``layers.9``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


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
    sources: dict[str, TensorInfo]
    shard: str

    def outputs(self) -> list[OutputEntry]:
        p, n, k = self.prefix, self.out_features, self.in_features
        groups = k // self.group_size if self.group_size else 1
        entries = [OutputEntry(f"{p}.weight", "I32", (k, n // 8))]
        if self.is_moe:
            entries.append(OutputEntry(f"{p}.weight_scale", "I64", (groups, n)))
        else:
            entries.append(OutputEntry(f"{p}.weight_scale_second", "F32", (groups, n)))
        entries.append(OutputEntry(f"{p}.scale_bias", "F32", (n, self.bias_chunks)))
        return entries


@dataclass
class MoELayer:
    prefix: str
    experts: list[int]
    hidden_size: int
    intermediate_size: int


@dataclass
class Plan:
    """Everything a conversion will do, derived from headers.

    Attributes:
        format: the layout name, ``processed`` for w4a8conv output, or ``unknown``.
        projections: the W4A8 projections to process, in natural name order.
        passthrough: tensors copied verbatim, in natural name order.
        shard_entries: per output shard file, every tensor it will hold.
        problems: every inconsistency found; a conversion refuses to start while any is listed.
    """

    format: str
    group_size: int | None
    projections: list[Projection] = field(default_factory=list)
    passthrough: list[TensorInfo] = field(default_factory=list)
    moe_layers: dict[str, MoELayer] = field(default_factory=dict)
    shard_entries: dict[str, list[OutputEntry]] = field(default_factory=dict)
    other_quant_types: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    processed_modules: int = 0  # W4A8 modules already processed (w4a8conv output)
    processed_linear: int = 0

    @property
    def w4a8_modules(self) -> int:
        return len(self.projections) or self.processed_modules

    @property
    def w4a8_linear(self) -> int:
        return sum(not p.is_moe for p in self.projections) or self.processed_linear

    @property
    def output_bytes(self) -> int:
        return sum(e.nbytes for entries in self.shard_entries.values() for e in entries)

    @property
    def num_experts(self) -> int:
        return sum(len(layer.experts) for layer in self.moe_layers.values())


def tensor_entries(description: dict) -> dict[str, str]:
    """The per-tensor part of a description (top-level keys such as ``version`` carry no dot)."""
    return {k: v for k, v in description.items() if "." in k and isinstance(v, str)}


def build_plan(ckpt: Checkpoint) -> Plan:
    """Plan the conversion of ``ckpt``: detect the layout, group tensors, lay out the output shards."""
    types = tensor_entries(ckpt.description)
    other_types: dict[str, int] = {}
    for name, quant_type in types.items():
        if name.endswith(".weight") and quant_type not in (W4A8_TYPE, PREPACKED_TYPE):
            other_types[quant_type] = other_types.get(quant_type, 0) + 1
    if TOOL_SECTION in ckpt.description:
        return _plan_processed(ckpt, types, other_types)

    problems: list[str] = []
    for name in sorted(types, key=natural_key):
        if name not in ckpt.tensors:
            problems.append(f"{ckpt.root / 'quant_model_description.json'}: lists tensor {name}, which no shard holds")
    _check_untyped_w4a8(ckpt, types, problems)
    prefixes = sorted(
        (n[: -len(".weight")] for n, t in types.items() if t == W4A8_TYPE and n.endswith(".weight")), key=natural_key
    )
    projections = [p for p in (_plan_projection(ckpt, prefix, problems) for prefix in prefixes) if p is not None]

    layouts = {p.layout.name for p in projections}
    group_sizes = {p.group_size for p in projections}
    fmt = "unknown"
    group_size = None
    if len(layouts) > 1:
        counts = ", ".join(f"{sum(p.layout.name == name for p in projections)} {name}" for name in sorted(layouts))
        problems.append(f"{ckpt.root}: W4A8 modules mix layouts ({counts})")
    elif layouts:
        fmt = layouts.pop()
        _check_description_agrees(ckpt, projections[0].layout, problems)
    if len(group_sizes) > 1:
        by_size = {g: [p.prefix for p in projections if p.group_size == g] for g in sorted(group_sizes)}
        usual = max(by_size, key=lambda g: len(by_size[g]))
        odd = ", ".join(f"{names[0]}.weight_scale_second gives {g}" for g, names in by_size.items() if g != usual)
        problems.append(f"{ckpt.root}: W4A8 modules use group size {usual} except: {odd}")
    elif group_sizes:
        group_size = group_sizes.pop()
        declared = ckpt.description.get("group_size")
        if declared is not None and declared != group_size:
            problems.append(
                f"{ckpt.root / 'quant_model_description.json'}: group_size is {declared} but the scale "
                f"tensors' shapes give {group_size}"
            )
    elif not projections and not problems:
        problems.append(f"{ckpt.root}: no tensor is {W4A8_TYPE} in quant_model_description.json; nothing to convert")

    moe_layers = _moe_layers(projections, problems)
    consumed = {info.name for p in projections for info in p.sources.values()}
    passthrough = sorted((t for n, t in ckpt.tensors.items() if n not in consumed), key=lambda t: natural_key(t.name))
    shard_entries: dict[str, list[OutputEntry]] = {}
    for info in passthrough:
        shard_entries.setdefault(info.path.name, []).append(OutputEntry(info.name, info.dtype, info.shape))
    for projection in projections:
        shard_entries.setdefault(projection.shard, []).extend(projection.outputs())
    return Plan(
        format=fmt,
        group_size=group_size,
        projections=projections,
        passthrough=passthrough,
        moe_layers=moe_layers,
        shard_entries=dict(sorted(shard_entries.items())),
        other_quant_types=other_types,
        problems=problems,
    )


def _check_untyped_w4a8(ckpt: Checkpoint, types: dict[str, str], problems: list[str]) -> None:
    """A weight the description does not call W4A8 must not look like one: it would be copied as is."""
    for name, quant_type in sorted(types.items(), key=lambda kv: natural_key(kv[0])):
        info = ckpt.tensors.get(name)
        if quant_type == W4A8_TYPE or not name.endswith(".weight") or info is None:
            continue
        prefix = name[: -len(".weight")]
        companions = [r for r in ("weight_scale_second", "scale_bias") if f"{prefix}.{r}" in ckpt.tensors]
        scale = ckpt.tensors.get(f"{prefix}.weight_scale")
        half = info.dtype == "I8" and scale is not None and len(info.shape) == 2 and scale.shape[0] == 2 * info.shape[0]
        if companions or half:
            evidence = f"has {prefix}.{companions[0]}" if companions else "holds half the rows its scale has"
            problems.append(
                f"{info.path}: tensor {name}: described as {quant_type} but {evidence}, as W4A8_DYNAMIC weights do"
            )


def _plan_projection(ckpt: Checkpoint, prefix: str, problems: list[str]) -> Projection | None:
    sources = {role: ckpt.tensors[f"{prefix}.{role}"] for role in SOURCE_ROLES if f"{prefix}.{role}" in ckpt.tensors}
    weight = sources.get("weight")
    scale = sources.get("weight_scale")
    if weight is None:
        return None  # already reported: listed in the description, absent from the shards
    where = f"{weight.path}: tensor {weight.name}"
    before = len(problems)
    if scale is None:
        problems.append(f"{where}: missing scale tensor {prefix}.weight_scale")
        return None
    if weight.dtype != "I8" or len(weight.shape) != 2:
        problems.append(f"{where}: expected an int8 matrix, found {weight.dtype}{list(weight.shape)}")
        return None
    if len(scale.shape) not in (1, 2) or (len(scale.shape) == 2 and scale.shape[1] != 1):
        problems.append(f"{scale.path}: tensor {scale.name}: expected [out, 1], found {list(scale.shape)}")
        return None
    out_features = scale.shape[0]
    rows, in_features = weight.shape
    if rows == out_features:
        packed = False
    elif rows * 2 == out_features:
        packed = True
    else:
        problems.append(
            f"{where}: shape {list(weight.shape)} fits neither [out, in] nor [out/2, in] for out={out_features}"
        )
        return None

    second = sources.get("weight_scale_second")
    group_size = 0
    if second is not None:
        groups = second.shape[1] if len(second.shape) == 2 else 0
        if len(second.shape) != 2 or second.shape[0] != out_features or groups == 0 or in_features % groups:
            problems.append(
                f"{second.path}: tensor {second.name}: shape {list(second.shape)} does not divide "
                f"[{out_features}, {in_features}] into groups"
            )
        else:
            group_size = in_features // groups
    layout = layout_from_evidence(packed, second is not None)
    if layout is None:
        problems.append(f"{where}: unpacked int4 weight with per-channel scales is no known W4A8 layout")
        return None
    if out_features % 8:
        problems.append(f"{where}: output dim {out_features} is not divisible by 8 (int32 words hold 8 int4)")
    if layout.per_group and group_size and in_features % group_size:
        problems.append(f"{where}: input dim {in_features} is not divisible by group_size {group_size}")

    match = MOE_EXPERT.match(prefix)
    is_moe = match is not None
    proj_name = match["proj"] if match else prefix.rsplit(".", 1)[-1]
    if not is_moe and not layout.per_group:
        problems.append(f"{where}: a W4A8 Linear with per-channel scales is not supported by vllm-ascend")

    stored_bias = sources.get("scale_bias")
    if layout.stores_scale_bias:
        if stored_bias is None:
            problems.append(f"{where}: missing {prefix}.scale_bias, which the {layout.name} layout carries")
            return None
        if len(stored_bias.shape) == 1:
            chunks = 1
        elif len(stored_bias.shape) == 2:
            chunks = stored_bias.shape[1]
        else:
            chunks = 0
        if stored_bias.shape[0] != out_features or chunks == 0 or in_features % chunks:
            problems.append(
                f"{stored_bias.path}: tensor {stored_bias.name}: shape {list(stored_bias.shape)} is not "
                f"[{out_features}, chunks] with chunks dividing {in_features}"
            )
            return None
    else:
        if stored_bias is not None:
            problems.append(
                f"{stored_bias.path}: tensor {stored_bias.name}: a {layout.name} checkpoint has no scale_bias"
            )
        chunks = SCALE_BIAS_CHUNKS if proj_name in ROW_PARALLEL and in_features % SCALE_BIAS_CHUNKS == 0 else 1
    for role in ("weight_offset", "weight_offset_second"):
        info = sources.get(role)
        twin = scale if role == "weight_offset" else second
        if info is not None and (twin is None or math.prod(info.shape) != math.prod(twin.shape)):
            problems.append(f"{info.path}: tensor {info.name}: shape {list(info.shape)} does not match its scale")
    if len(problems) > before:
        return None
    return Projection(
        prefix=prefix,
        is_moe=is_moe,
        layout=layout,
        out_features=out_features,
        in_features=in_features,
        group_size=group_size,
        bias_chunks=chunks,
        sources=sources,
        shard=weight.path.name,
    )


def _check_description_agrees(ckpt: Checkpoint, layout: SourceLayout, problems: list[str]) -> None:
    path = ckpt.root / "quant_model_description.json"
    version = ckpt.description.get("version")
    if layout.packed_on_disk and version != "1.0.0":
        problems.append(
            f"{path}: version is {version!r} but the weights are packed two int4 per byte, as in 1.0.0 "
            "(vllm-ascend would misread them)"
        )
    if not layout.packed_on_disk and version == "1.0.0":
        problems.append(f"{path}: version is '1.0.0' but the weights hold one int4 per byte, as in mindie output")
    declared = ckpt.description.get("group_size")
    if version == "1.0.0" and declared is None:
        problems.append(f"{path}: version 1.0.0 without group_size; vllm-ascend would assume 256")


def _moe_layers(projections: list[Projection], problems: list[str]) -> dict[str, MoELayer]:
    by_layer: dict[str, dict[int, dict[str, Projection]]] = {}
    for p in projections:
        match = MOE_EXPERT.match(p.prefix)
        if match:
            by_layer.setdefault(match["layer"], {}).setdefault(int(match["expert"]), {})[match["proj"]] = p
    layers: dict[str, MoELayer] = {}
    for layer_prefix, experts in sorted(by_layer.items(), key=lambda kv: natural_key(kv[0])):
        shapes = set()
        for expert, projs in sorted(experts.items()):
            missing = [name for name in MOE_PROJECTIONS if name not in projs]
            if missing:
                problems.append(f"{layer_prefix}.{expert}: W4A8 expert lacks {', '.join(missing)}")
                continue
            gate, up, down = (projs[name] for name in MOE_PROJECTIONS)
            shapes.add(
                (
                    gate.in_features,
                    gate.out_features,
                    up.in_features,
                    up.out_features,
                    down.in_features,
                    down.out_features,
                )
            )
        if not shapes:
            continue
        hidden, inter = next(iter(shapes))[0], next(iter(shapes))[1]
        if len(shapes) > 1 or shapes != {(hidden, inter, hidden, inter, inter, hidden)}:
            problems.append(f"{layer_prefix}: experts disagree on shapes (want gate/up [I, H] and down [H, I] for all)")
        expected = list(range(len(experts)))
        if sorted(experts) != expected:
            problems.append(f"{layer_prefix}: expert indices are not 0..{len(experts) - 1}")
        layers[layer_prefix] = MoELayer(layer_prefix, sorted(experts), hidden, inter)
    return layers


def _plan_processed(ckpt: Checkpoint, types: dict[str, str], other_types: dict[str, int]) -> Plan:
    """A plan that only describes w4a8conv output (for ``inspect``); it converts nothing."""
    section = ckpt.description.get(TOOL_SECTION) or {}
    plan = Plan(format=PROCESSED_FORMAT, group_size=section.get("group_size"), other_quant_types=other_types)
    layers: dict[str, set[int]] = {}
    count = 0
    for name, quant_type in types.items():
        if quant_type != PREPACKED_TYPE or not name.endswith(".weight"):
            continue
        count += 1
        if name not in ckpt.tensors:
            plan.problems.append(
                f"{ckpt.root / 'quant_model_description.json'}: lists tensor {name}, which no shard holds"
            )
        match = MOE_EXPERT.match(name[: -len(".weight")])
        if match:
            layers.setdefault(match["layer"], set()).add(int(match["expert"]))
        else:
            plan.processed_linear += 1
    for layer_prefix, experts in layers.items():
        plan.moe_layers[layer_prefix] = MoELayer(layer_prefix, sorted(experts), 0, 0)
    if not count:
        plan.problems.append(f"{ckpt.root}: processed checkpoint lists no {PREPACKED_TYPE} weight")
    plan.processed_modules = count
    return plan
