"""Building a :class:`~.plan.ConversionPlan` from a checkpoint's headers alone.

The planner groups each W4A8 projection's tensors, checks their shapes, asks the source registry
which layout they are in and the target whether it can serve them, and lays out the output shards.
It never raises on a bad checkpoint: it collects every problem, so ``inspect`` can list them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from .. import __version__
from ..experts import ROLES, parse_expert
from ..formats.canary import canary_spec
from ..formats.projection import Projection
from ..formats.sources import ModuleHeaders, detect_source
from ..formats.targets import DEFAULT_TARGET, TARGETS, ServingTarget, get_target
from ..names import (
    CONFIG_FILE,
    DESCRIPTION_FILE,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST_FILE,
    PREPACKED_TYPE,
    SCALE_BIAS_CHUNKS,
    SOURCE_ROLES,
    TOOL_SECTION,
    W4A8_TYPE,
    natural_key,
    tensor_entries,
)
from ..reading.checkpoint import Checkpoint
from ..reading.gc_hold import holding_gc
from ..safetensors_io import TensorInfo, layout_header
from .plan import ConversionPlan, MoELayer, OutputShard, shard_entries

SHARD_METADATA = {"format": "pt", "converted_by": f"w4a8conv {__version__}"}


@holding_gc
def build_plan(
    ckpt: Checkpoint, target: str = DEFAULT_TARGET, array_size: int = 1, checksums: bool = True
) -> ConversionPlan:
    """Plan the conversion of ``ckpt`` for ``target``, split into ``array_size`` shares.

    Args:
        ckpt: the source checkpoint, as read from its headers.
        target: the serving target's name.
        array_size: the number of jobs of an array sharing the conversion.
        checksums: whether the output gets a sha256 manifest (the description says so).
    """
    serving = get_target(target)
    types = tensor_entries(ckpt.description, ckpt.tensors)
    description_path = ckpt.description_path or ckpt.root / CONFIG_FILE
    other_types: dict[str, int] = {}
    for name, quant_type in types.items():
        if name.endswith(".weight") and quant_type not in (W4A8_TYPE, PREPACKED_TYPE):
            other_types[quant_type] = other_types.get(quant_type, 0) + 1
    problems: list[str] = []
    for name in sorted(types, key=natural_key):
        if name not in ckpt.tensors:
            problems.append(f"{description_path}: lists tensor {name}, which no shard holds")
    _check_untyped_w4a8(ckpt, types, problems)
    prefixes = sorted(
        (n[: -len(".weight")] for n, t in types.items() if t == W4A8_TYPE and n.endswith(".weight")), key=natural_key
    )
    modules = [p for p in (_plan_projection(ckpt, prefix, problems) for prefix in prefixes) if p is not None]
    refused: dict[str, list[Projection]] = {}  # one problem per reason, not one per expert
    for module in modules:
        refusal = serving.refusal(module)
        if refusal is not None:
            others = [name for name, each in TARGETS.items() if each.refusal(module) is None]
            hint = f"; --target {others[-1]} serves it" if others else ""
            refused.setdefault(f"{serving.name}: {refusal}{hint}", []).append(module)
    for reason, alike in refused.items():
        more = f" (and {len(alike) - 1} more W4A8 modules)" if len(alike) > 1 else ""
        problems.append(f"{alike[0].where('weight')}{more}: {reason}")
    serving_targets = tuple(
        name for name, each in TARGETS.items() if modules and all(each.refusal(m) is None for m in modules)
    )

    layouts = {p.layout.name for p in modules}
    group_sizes = {p.group_size for p in modules}
    layout_name, group_size = "unknown", None
    if len(layouts) > 1:
        counts = ", ".join(f"{sum(p.layout.name == name for p in modules)} {name}" for name in sorted(layouts))
        problems.append(f"{ckpt.root}: W4A8 modules mix layouts ({counts})")
    elif layouts:
        layout_name = layouts.pop()
        if modules[0].layout.described_by_config != (ckpt.served_config is not None):
            where = "config.json's quantization_config" if ckpt.served_config is not None else DESCRIPTION_FILE
            problems.append(f"{modules[0].where('weight')}: {layout_name} weights in a checkpoint described by {where}")
        modules[0].layout.check_description(ckpt.description, str(description_path), problems)
        if ckpt.description.get("version") == "1.0.0" and ckpt.description.get("group_size") is None:
            problems.append(f"{description_path}: version 1.0.0 without group_size; vllm-ascend would assume 256")
    if len(group_sizes) > 1:
        by_size = {g: [p.prefix for p in modules if p.group_size == g] for g in sorted(group_sizes)}
        usual = max(by_size, key=lambda g: len(by_size[g]))
        odd = ", ".join(f"{names[0]}.weight_scale_second gives {g}" for g, names in by_size.items() if g != usual)
        problems.append(f"{ckpt.root}: W4A8 modules use group size {usual} except: {odd}")
    elif group_sizes:
        group_size = group_sizes.pop()
        declared = ckpt.description.get("group_size")
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int)):
            problems.append(
                f"{description_path}: group_size is {json.dumps(declared)}, a {type(declared).__name__}; "
                f"vllm-ascend reads an integer (the scale tensors' shapes give {group_size}): write {group_size}"
            )
        elif declared is not None and declared != group_size:
            problems.append(
                f"{description_path}: group_size is {declared} but the scale tensors' shapes give {group_size}"
            )
    elif not modules and not problems:
        problems.append(f"{ckpt.root}: no tensor is {W4A8_TYPE} in quant_model_description.json; nothing to convert")

    moe_layers = _moe_layers(modules, problems)
    consumed = {info.name for p in modules for info in p.sources.values()}
    passthrough = sorted((t for n, t in ckpt.tensors.items() if n not in consumed), key=lambda t: natural_key(t.name))
    shards = _output_shards(passthrough, modules, serving)
    engine_keys = modules[0].layout.engine_keys(ckpt.description, group_size) if modules else {}
    canary = canary_spec(modules, engine_keys)
    description = _processed_description(ckpt, consumed, shards, serving, layout_name, group_size, checksums, canary)
    return ConversionPlan(
        source=ckpt.root.resolve(),
        source_layout=layout_name,
        target=serving.name,
        group_size=group_size,
        params_dtype=ckpt.params_dtype_name,
        tool_version=__version__,
        checksums=checksums,
        modules=tuple(modules),
        passthrough=tuple(passthrough),
        moe_layers=tuple(moe_layers),
        shards=shards,
        shares=assign_shares(shards, array_size),
        extra_files=tuple(str(p) for p in ckpt.extra_files),
        index_name=f"{ckpt.prefix}{INDEX_SUFFIX}",
        description=description,
        input_bytes=ckpt.total_bytes,
        other_quant_types=dict(sorted(other_types.items())),
        problems=tuple(problems),
        serving_targets=serving_targets,
        inputs=ckpt.input_identities(),
        served_config=ckpt.served_config,
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


def _module_headers(ckpt: Checkpoint, prefix: str, problems: list[str]) -> ModuleHeaders | None:
    """A projection's tensors with the shape checks every layout shares, or None (problems say why)."""
    sources = {role: ckpt.tensors[f"{prefix}.{role}"] for role in SOURCE_ROLES if f"{prefix}.{role}" in ckpt.tensors}
    weight = sources.get("weight")
    scale = sources.get("weight_scale")
    if weight is None:
        return None  # already reported: listed in the description, absent from the shards
    where = f"{weight.path}: tensor {weight.name}"
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
    if rows not in (out_features, out_features / 2):
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
    return ModuleHeaders(
        prefix=prefix,
        proj_name=prefix.rsplit(".", 1)[-1],
        sources=sources,
        out_features=out_features,
        in_features=in_features,
        packed_on_disk=rows != out_features,
        per_group=second is not None,
        group_size=group_size,
    )


def _plan_projection(ckpt: Checkpoint, prefix: str, problems: list[str]) -> Projection | None:
    before = len(problems)
    module = _module_headers(ckpt, prefix, problems)
    if module is None:
        return None
    layout = detect_source(module)
    if layout is None:
        problems.append(f"{module.where}: unpacked int4 weight with per-channel scales is no known W4A8 layout")
        return None
    if module.out_features % 8:
        problems.append(
            f"{module.where}: output dim {module.out_features} is not divisible by 8 (int32 words hold 8 int4)"
        )
    projection = Projection(
        prefix=prefix,
        is_moe=parse_expert(prefix) is not None,
        layout=layout,
        out_features=module.out_features,
        in_features=module.in_features,
        group_size=module.group_size,
        bias_chunks=0,
        sources=module.sources,
        shard=module.sources["weight"].path.name,
    )
    chunks = layout.bias_chunks(module, problems)
    if chunks is None:
        return None
    scale, second = module.sources["weight_scale"], module.sources.get("weight_scale_second")
    for role, twin in (("weight_offset", scale), ("weight_offset_second", second), ("weight_zero_point", scale)):
        info = module.sources.get(role)
        if info is not None and (twin is None or math.prod(info.shape) != math.prod(twin.shape)):
            problems.append(f"{info.path}: tensor {info.name}: shape {list(info.shape)} does not match its scale")
    if len(problems) > before:
        return None
    return replace(projection, bias_chunks=chunks)


def _moe_layers(projections: list[Projection], problems: list[str]) -> list[MoELayer]:
    by_layer: dict[str, dict[int, dict[str, Projection]]] = {}
    namings: dict[str, set[str]] = {}
    for p in projections:
        name = parse_expert(p.prefix)
        if name is not None:
            by_layer.setdefault(name.layer, {}).setdefault(name.expert, {})[name.role] = p
            namings.setdefault(name.layer, set()).add(name.naming.label)
    layers: list[MoELayer] = []
    for layer_prefix, experts in sorted(by_layer.items(), key=lambda kv: natural_key(kv[0])):
        if len(namings[layer_prefix]) > 1:
            problems.append(f"{layer_prefix}: experts mix the namings {' and '.join(sorted(namings[layer_prefix]))}")
            continue
        shapes = set()
        for expert, projs in sorted(experts.items()):
            missing = [role for role in ROLES if role not in projs]
            if missing:
                naming = parse_expert(next(iter(projs.values())).prefix).naming
                lacks = ", ".join(naming.name_of(role) for role in missing)
                problems.append(f"{layer_prefix}.{expert}: W4A8 expert lacks {lacks}")
                continue
            gate, up, down = (projs[role] for role in ROLES)
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
        if sorted(experts) != list(range(len(experts))):
            problems.append(f"{layer_prefix}: expert indices are not 0..{len(experts) - 1}")
        layers.append(MoELayer(layer_prefix, tuple(sorted(experts)), hidden, inter))
    return layers


def _output_shards(
    passthrough: list[TensorInfo], modules: list[Projection], target: ServingTarget
) -> tuple[OutputShard, ...]:
    """One output shard per source shard, named alike: its pass-through tensors, then its modules' outputs."""
    copies: dict[str, list[TensorInfo]] = {}
    work: dict[str, list[Projection]] = {}
    for info in passthrough:
        copies.setdefault(info.path.name, []).append(info)
    for module in modules:
        work.setdefault(module.shard, []).append(module)
    shards = []
    for name in sorted(copies.keys() | work.keys()):
        shard_copies, shard_work = tuple(copies.get(name, ())), tuple(work.get(name, ()))
        entries = shard_entries(shard_copies, shard_work, target)
        header, _ = layout_header(entries, SHARD_METADATA)
        size = len(header) + sum(e.nbytes for e in entries)
        shards.append(OutputShard(name, entries, shard_copies, shard_work, size))
    return tuple(shards)


def assign_shares(shards: tuple[OutputShard, ...], array_size: int) -> tuple[tuple[str, ...], ...]:
    """Split shards into ``array_size`` disjoint shares of similar bytes; the same for every caller.

    Largest shard first to the share with the fewest bytes (ties: lower index), so every job of an
    array computes the same split from the same plan.
    """
    shares: list[list[str]] = [[] for _ in range(array_size)]
    loads = [0] * array_size
    for shard in sorted(shards, key=lambda s: (-s.nbytes, natural_key(s.name))):
        target = min(range(array_size), key=lambda i: (loads[i], i))
        shares[target].append(shard.name)
        loads[target] += shard.nbytes
    return tuple(tuple(sorted(share, key=natural_key)) for share in shares)


def _processed_description(
    ckpt: Checkpoint,
    consumed: set[str],
    shards: tuple[OutputShard, ...],
    target: ServingTarget,
    layout_name: str,
    group_size: int | None,
    checksums: bool,
    canary: dict | None,
) -> dict:
    """The source description with processed tensors re-typed and a section recording what was done.

    ``consumed``: the source tensors the modules read; ``shards``: the output, whose entries after the
    pass-through ones are the modules' outputs (:func:`~.plan.shard_entries`).
    """
    entries = tensor_entries(ckpt.description, ckpt.tensors)
    description = {k: v for k, v in ckpt.description.items() if k not in entries}
    description["group_size"] = group_size
    for name, quant_type in entries.items():
        if name not in consumed:
            description[name] = quant_type
    for shard in shards:
        for entry in shard.entries[len(shard.passthrough) :]:
            description[entry.name] = target.quant_type
    description[TOOL_SECTION] = {
        "tool": "w4a8conv",
        "tool_version": __version__,
        "format_version": FORMAT_VERSION,
        "source_layout": layout_name,
        "source_version": ckpt.description.get("version"),
        "group_size": group_size,
        "quant_type": target.quant_type,
        "params_dtype": ckpt.params_dtype_name,
        **target.section(),
        "scale_bias_chunks": SCALE_BIAS_CHUNKS,
        "checksum_manifest": MANIFEST_FILE if checksums else None,
    }
    if canary is not None:  # finalize adds the file's sha256
        description[TOOL_SECTION]["canary"] = canary
    if ckpt.served_config is not None:  # the config.json served beside it has none: kept here, as read
        description[TOOL_SECTION]["source_quantization_config"] = ckpt.config["quantization_config"]
    return dict(sorted(description.items(), key=lambda kv: natural_key(kv[0])))
