"""Synthetic msModelSlim checkpoints in every layout: tiny for the demo and the tests, or DeepSeek-shaped
at any size for benchmarks, streamed to disk a projection at a time.

A DeepSeek-like model: dense layers first, then MoE layers whose routed experts are W4A8_DYNAMIC,
attention and shared experts W8A8_DYNAMIC, router and norms FLOAT. Every source layout is written
from the same int4 values and scales (:func:`w4a8_truth`), so their conversions can be compared;
each layout's module encodes them (``SourceLayout.synthetic_tensors``), from W4A8_FORMATS.md and
independently of ``w4a8conv.formats.packing``, so the tests do not check the packing against itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..formats.families import DEFAULT_FAMILY, FAMILIES, Family
from ..formats.sources import get_source
from ..names import DESCRIPTION_FILE, INDEX_SUFFIX, W4A8_TYPE, natural_key
from ..progress import Progress
from ..safetensors_io import OutputEntry, ShardWriter, dtype_name
from .random_values import FastRandom, Random, ShapeOnly, TorchRandom, seed_of

LEGACY_SHARD_PREFIX = "quant_model_weight_w8a8_dynamic"  # what `synthetic` named shards before issue 16
# Style "msmodelslim" writes what msModelSlim 26.1 does: its CLI's ascend_v1 saver for 1.0.0 weights,
# its old llm_ptq API (quant type in the name) for mindie; style "legacy" what w4a8conv wrote before.
STYLES = ("msmodelslim", "legacy")
MLA_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def shard_prefix(layout: str, spec: SyntheticSpec | None = None) -> str:
    """How the writer of ``layout`` names shards (``<prefix>-0000k-of-0000N.safetensors``) and the index."""
    spec = spec or SyntheticSpec()
    if get_source(layout).described_by_config:
        return "model"  # transformers' save_pretrained, as LLM-Compressor saves
    if spec.style == "legacy":
        return LEGACY_SHARD_PREFIX
    return "quant_model_weight_w4a8_dynamic" if layout == "mindie" else "quant_model_weights"


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic model. Defaults are tiny; dims satisfy every divisibility rule."""

    hidden: int = 128
    intermediate: int = 64
    experts: int = 4
    dense_layers: int = 1
    moe_layers: int = 2
    group_size: int = 32
    vocab: int = 64
    shards: int = 4  # with the MTP layer, enough that MoE layers span shards
    w4a8_linear: bool = True  # q_b_proj (q_proj) / o_proj as W4A8 Linear (per-group layouts only)
    seed: int = 0
    style: str = "msmodelslim"  # see STYLES; "legacy" also keeps the old writer's torch draws
    mtp_layers: int = 1  # DeepSeek's multi-token-prediction layer: experts named like W4A8's, typed W8A8_DYNAMIC
    quarot: bool = True  # msModelSlim's QuaRot: a global rotation in optional/quarot.safetensors
    family: str = DEFAULT_FAMILY  # whose names, recipe and config (see families.FAMILIES)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r}: one of {', '.join(STYLES)}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: one of {', '.join(FAMILIES)}")

    @property
    def model(self) -> Family:
        return FAMILIES[self.family]

    def layer_prefix(self, block: int) -> str:
        return self.model.layer_prefix(block, self.dense_layers + self.moe_layers)


@dataclass(frozen=True)
class W4A8Truth:
    """The underlying values of one W4A8 projection, before any layout encodes them."""

    values: torch.Tensor  # int8 [out, in], -8..7
    weight_scale: torch.Tensor  # float32 [out, 1]
    weight_scale_second: torch.Tensor  # float32 [out, in/g]
    row_parallel: bool


def _decoder_layers(spec: SyntheticSpec) -> range:
    return range(spec.dense_layers + spec.moe_layers)


def _all_layers(spec: SyntheticSpec, layout: str) -> range:
    """Decoder layers, then the MTP layers (msModelSlim styles only: LLM-Compressor skips them)."""
    mtp = spec.mtp_layers if spec.style != "legacy" and not get_source(layout).described_by_config else 0
    mtp = mtp if spec.model.mtp else 0
    return range(spec.dense_layers + spec.moe_layers + mtp)


def _attention(spec: SyntheticSpec) -> tuple[str, str]:
    """The attention projections that may be W4A8 Linear: MLA's q_b_proj and o_proj (legacy: q_proj)."""
    return ("q_proj", "o_proj") if spec.style == "legacy" else ("q_b_proj", "o_proj")


def _w4a8_prefixes(spec: SyntheticSpec, layout: str, layers: Iterable[int]) -> list[tuple[str, int, int, bool]]:
    """(prefix, out, in, row_parallel) of every W4A8 projection in ``layers``."""
    h, i = spec.hidden, spec.intermediate
    family, naming = spec.model, spec.model.naming
    out = []
    for layer in layers:
        base = spec.layer_prefix(layer)
        mtp = layer not in _decoder_layers(spec)
        if mtp and family.mtp_experts != W4A8_TYPE:
            continue  # an MTP layer whose experts the family's recipe leaves W8A8 or unquantized
        if spec.w4a8_linear and family.w4a8_linear and not mtp and get_source(layout).synthetic_linear:
            column, row = _attention(spec)
            out.append((f"{base}.self_attn.{column}", h, h, False))
            out.append((f"{base}.self_attn.{row}", h, h, True))
        if layer >= spec.dense_layers:
            for e in range(spec.experts):
                p = f"{base}.{family.mlp}.experts.{e}"
                out += [(f"{p}.{naming.gate}", i, h, False), (f"{p}.{naming.up}", i, h, False)]
                out.append((f"{p}.{naming.down}", h, i, True))
    return out


def _random_source(spec: SyntheticSpec, key: object, shape_only: bool = False) -> Random:
    """The values of one block or projection: reproducible from the model seed and ``key``."""
    if shape_only:
        return ShapeOnly()
    kind = TorchRandom if spec.style == "legacy" else FastRandom
    return kind(seed_of(spec.seed, key))


def _truth(spec: SyntheticSpec, prefix: str, n: int, k: int, row_parallel: bool, shape_only: bool) -> W4A8Truth:
    random = _random_source(spec, prefix, shape_only)
    values = random.int4(n, k)
    weight_scale = random.uniform(0.02, 0.001, n, 1)
    second = random.uniform(1.5, 0.25, n, k // spec.group_size)
    return W4A8Truth(values, weight_scale, second, row_parallel)


def w4a8_truth(
    spec: SyntheticSpec, layout: str = "mindie", layers: Iterable[int] | None = None
) -> dict[str, W4A8Truth]:
    """The int4 values and scales of every W4A8 projection, identical for every layout."""
    layers = _all_layers(spec, layout) if layers is None else layers
    return {
        prefix: _truth(spec, prefix, n, k, row_parallel, False)
        for prefix, n, k, row_parallel in _w4a8_prefixes(spec, layout, layers)
    }


def _old_api_save(layout: str, spec: SyntheticSpec) -> bool:
    """msModelSlim's old llm_ptq API saving mindie without ``part_file_size``: one file, as it writes it."""
    return layout == "mindie" and spec.style != "legacy" and spec.shards == 1


def _kind(spec: SyntheticSpec, block: int | None) -> str:
    if block is None:
        return "outside"
    if block < spec.dense_layers:
        return "dense"
    return "moe" if block < spec.dense_layers + spec.moe_layers else "mtp"


@dataclass(frozen=True)
class _Planned:
    entry: OutputEntry
    quant_type: str


class _BlockPlans:
    """Every block's tensors (name, dtype, shape, type) in the order shards are cut, naturally sorted.

    Every dense, MoE or MTP layer has the tensors of the others of its kind under its own number, so
    one of each kind is built, in shape only, and renamed for the rest."""

    def __init__(self, spec: SyntheticSpec, layout: str) -> None:
        self.spec, self.layout = spec, layout
        self._first: dict[str, tuple[int | None, list[_Planned]]] = {}

    def _template(self, block: int | None) -> tuple[int | None, list[_Planned]]:
        """The first block of ``block``'s kind and its planned tensors, built in shape only once."""
        kind = _kind(self.spec, block)
        if kind not in self._first:
            tensors, types = build_tensors(self.spec, self.layout, block, shape_only=True)
            planned = [
                _Planned(OutputEntry(name, dtype_name(t.dtype), tuple(t.shape)), types[name])
                for name, t in sorted(tensors.items(), key=lambda kv: natural_key(kv[0]))
            ]
            self._first[kind] = (block, planned)
        return self._first[kind]

    def __call__(self, block: int | None) -> list[_Planned]:
        first, planned = self._template(block)
        if block == first:
            return planned
        old, new = f"{self.spec.layer_prefix(first)}.", f"{self.spec.layer_prefix(block)}."
        renamed = []
        for p in planned:
            assert p.entry.name.startswith(old), p.entry.name
            entry = OutputEntry(new + p.entry.name[len(old) :], p.entry.dtype, p.entry.shape)
            renamed.append(_Planned(entry, p.quant_type))
        return renamed

    def nbytes(self, block: int | None) -> int:
        """Its kind's bytes: sizes need no renaming (which costs 0.3 s over a 400 GB model)."""
        return sum(p.entry.nbytes for p in self._template(block)[1])


def block_bytes(spec: SyntheticSpec, layout: str) -> dict[int | None, int]:
    """The shard bytes of every block (``None``: the tensors outside the layers), from their shapes."""
    plans = _BlockPlans(spec, layout)
    return {block: plans.nbytes(block) for block in [None, *_all_layers(spec, layout)]}


def moe_layers_for(spec: SyntheticSpec, layout: str, nbytes: float) -> SyntheticSpec:
    """``spec`` with as many MoE layers as make about ``nbytes`` of shards (at least one)."""
    from dataclasses import replace

    one = replace(spec, moe_layers=1)
    sizes = block_bytes(one, layout)
    per_layer = sizes[spec.dense_layers]
    fixed = sum(sizes.values()) - per_layer
    return replace(spec, moe_layers=max(1, round((nbytes - fixed) / per_layer)))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


Group = tuple[dict[str, "torch.Tensor"], str]  # tensors of one projection (or a few small ones), their type


def build_tensors(
    spec: SyntheticSpec, layout: str, layer: int | None = None, shape_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one decoder layer (or, with ``layer=None``, those outside the layers) and their
    types; with ``shape_only``, meta tensors of their shapes and dtypes."""
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for group, quant_type in block_groups(spec, layout, layer, shape_only):
        tensors.update(group)
        types.update(dict.fromkeys(group, quant_type))
    return tensors, types


def block_groups(
    spec: SyntheticSpec, layout: str, layer: int | None = None, shape_only: bool = False
) -> Iterator[Group]:
    """:func:`build_tensors`' tensors a projection at a time, so a layer of 256 experts (gigabytes) is
    never held whole. The draws from the block's random source keep the order they always had."""
    source = get_source(layout)
    random = _random_source(spec, layer, shape_only)
    h, i, e = spec.hidden, spec.intermediate, spec.experts
    family = spec.model
    gate, up, down = family.naming.gate, family.naming.up, family.naming.down
    bf16 = random.bf16
    if layer is None:
        embed, norm, head = family.outside
        yield {f"{embed}.weight": bf16(spec.vocab, h)}, "FLOAT"
        yield {f"{norm}.weight": bf16(h), f"{head}.weight": bf16(spec.vocab, h)}, "FLOAT"
        if family.dotless:  # DeepSeek-V4's hyper-connection head: fp32, typed FLOAT, named without a dot
            sizes = {"hc_head_fn": (4, 4 * h), "hc_head_base": (4,), "hc_head_scale": (1,)}
            yield {name: random.uniform(0.5, 0.1, *sizes.get(name, (1,))) for name in family.dotless}, "FLOAT"
        return
    w4a8 = _w4a8_prefixes(spec, layout, [layer])
    for prefix, n, k, row_parallel in w4a8:
        t = _truth(spec, prefix, n, k, row_parallel, shape_only)
        tensors = source.synthetic_tensors(prefix, t.values, t.weight_scale, t.weight_scale_second, t.row_parallel)
        yield tensors, W4A8_TYPE
    quantized = {prefix for prefix, *_ in w4a8}
    base = spec.layer_prefix(layer)
    mlp = f"{base}.{family.mlp}"
    yield {f"{base}.{family.norms[0]}.weight": bf16(h), f"{base}.{family.norms[1]}.weight": bf16(h)}, "FLOAT"
    if spec.style == "legacy":
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{base}.self_attn.{proj}" not in quantized:
                yield source.synthetic_w8a8(f"{base}.self_attn.{proj}", h, h, random), "W8A8_DYNAMIC"
    elif family.attention == "mla":
        yield from _mla_attention(spec, source, f"{base}.self_attn", quantized, random)
    else:
        for proj in family.attention_projections:
            yield source.synthetic_w8a8(f"{base}.{family.attention}.{proj}", h, h, random), "W8A8_DYNAMIC"
    if layer < spec.dense_layers:
        for proj, n, k in ((gate, 2 * i, h), (up, 2 * i, h), (down, h, 2 * i)):
            yield source.synthetic_w8a8(f"{mlp}.{proj}", n, k, random), "W8A8_DYNAMIC"
        return
    # DeepSeek's router bias: fp32 in the legacy style, in the model dtype as msModelSlim leaves it
    router = bf16(e, h)
    bias = random.normal(e)
    yield {f"{mlp}.gate.weight": router}, "FLOAT"
    yield {f"{mlp}.gate.e_score_correction_bias": bias if spec.style == "legacy" else bias.bfloat16()}, "FLOAT"
    if family.shared is not None:
        for proj, n, k in ((gate, i, h), (up, i, h), (down, h, i)):
            yield source.synthetic_w8a8(f"{mlp}.{family.shared}.{proj}", n, k, random), "W8A8_DYNAMIC"
    if layer not in _decoder_layers(spec):  # an MTP layer: its experts as the recipe leaves them, and its own parts
        if family.mtp_experts != W4A8_TYPE:
            for expert in range(e):
                for proj, n, k in ((gate, i, h), (up, i, h), (down, h, i)):
                    name = f"{mlp}.experts.{expert}.{proj}"
                    if family.mtp_experts == "FLOAT":
                        yield {f"{name}.weight": bf16(n, k)}, "FLOAT"
                    else:
                        yield source.synthetic_w8a8(name, n, k, random), family.mtp_experts
        yield {f"{base}.{name}.weight": bf16(h) for name in ("enorm", "hnorm", "shared_head.norm")}, "FLOAT"
        yield {f"{base}.eh_proj.weight": bf16(h, 2 * h)}, "FLOAT"


def _mla_attention(spec, source, prefix: str, quantized: set[str], random: Random) -> Iterator[Group]:
    """DeepSeek's multi-head latent attention as msModelSlim quantizes it: W8A8 static projections (with
    input_scale, input_offset, deq_scale and quant_bias; deq_scale stays fp32 for a bf16 model), kv_b_proj
    and the norms left in bf16. A compressed-tensors checkpoint holds its W8A8 (dynamic) under the same names."""
    h = spec.hidden
    for proj in MLA_PROJECTIONS:
        name = f"{prefix}.{proj}"
        if name in quantized:
            continue
        if proj == "kv_b_proj" and not source.described_by_config:
            yield {f"{name}.weight": random.bf16(h, h)}, "FLOAT"
        elif source.described_by_config:
            yield source.synthetic_w8a8(name, h, h, random), "W8A8_DYNAMIC"
        else:
            static = {
                f"{name}.weight": random.int8(h, h),
                f"{name}.quant_bias": random.int32(-1000, 1000, h),
                f"{name}.input_scale": random.uniform(0.05, 0, 1),
                f"{name}.input_offset": torch.zeros(1),
                f"{name}.deq_scale": random.uniform(1e-4, 0, h),
            }
            yield static, "W8A8"
    yield {f"{prefix}.{norm}.weight": random.bf16(h) for norm in ("q_a_layernorm", "kv_a_layernorm")}, "FLOAT"


def write_checkpoint(
    path: Path | str,
    layout: str,
    spec: SyntheticSpec | None = None,
    shard_bytes: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write a synthetic msModelSlim W4A8_DYNAMIC checkpoint of ``layout`` into directory ``path``.

    One decoder layer is generated at a time and shards are cut every ``shard_bytes`` (default: the
    size split into ``spec.shards``), so layers span shards and memory stays at about one shard.
    Everything is written into a temporary directory beside ``path`` and renamed into place at the
    end: an interrupted run leaves only that (removed by the next run), never a half checkpoint.

    Example:
        >>> write_checkpoint(tmp_path / "ds-mindie", "mindie")  # doctest: +SKIP
    """
    spec = spec or SyntheticSpec()
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.synthetic-partial"
    shutil.rmtree(path, ignore_errors=True)  # a run interrupted before
    path.mkdir()
    _write(path, layout, spec, shard_bytes, progress or Progress())
    for file in path.rglob("*"):
        if file.is_file():
            file.chmod(_FILE_MODE)  # safetensors writes 0600; convert's files are 0644 (less the umask)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    path.rename(final)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _cut_shards(plans: _BlockPlans, blocks: list[int | None], shard_bytes: int) -> list[list[_Planned]]:
    """Tensors in order, a new shard each time one reaches ``shard_bytes``: layers span shards."""
    shards: list[list[_Planned]] = []
    current: list[_Planned] = []
    current_bytes = 0
    for block in blocks:
        for planned in plans(block):
            current.append(planned)
            current_bytes += planned.entry.nbytes
            if current_bytes >= shard_bytes:
                shards.append(current)
                current, current_bytes = [], 0
    if current:
        shards.append(current)
    return shards


# Tensors generated but not yet on disk: the next ones are generated while the disk takes these.
WRITE_BACKLOG_BYTES = 64 << 20


class _BackgroundWrites:
    """Calls run in order on one thread; :meth:`submit` waits while ``limit`` bytes are queued."""

    def __init__(self, limit: int = WRITE_BACKLOG_BYTES) -> None:
        self.limit, self.queued = limit, 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="synthetic-write")
        self.waiting: deque[tuple[Future, int]] = deque()

    def submit(self, nbytes: int, call, *args) -> None:
        while self.waiting and (self.queued + nbytes > self.limit or self.waiting[0][0].done()):
            self._wait_oldest()
        self.waiting.append((self.pool.submit(call, *args), nbytes))
        self.queued += nbytes

    def _wait_oldest(self) -> None:
        future, nbytes = self.waiting.popleft()
        self.queued -= nbytes
        future.result()  # a write's error surfaces here

    def drain(self) -> None:
        while self.waiting:
            self._wait_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _ShardFiles:
    """The planned shards, each opened at its first tensor and finished (fsynced, renamed) at its last."""

    def __init__(self, path: Path, names: list[str], shards: list[list[_Planned]], progress: Progress) -> None:
        self.path, self.names, self.shards, self.progress = path, names, shards, progress
        self.shard_of = {p.entry.name: k for k, planned in enumerate(shards) for p in planned}
        self.left = [len(planned) for planned in shards]
        self.writers: dict[int, ShardWriter] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k = self.shard_of[name]
        writer = self.writers.get(k)
        if writer is None:
            entries = [p.entry for p in self.shards[k]]
            # as save_file lays them out: the legacy style's files stay byte for byte what they were
            writer = ShardWriter(
                self.path / self.names[k], entries, {"format": "pt"}, checksum=False, as_save_file=True
            )
            self.writers[k] = writer
        writer.write_tensor(name, tensor)
        self.progress.update("copy", name, _nbytes(tensor))
        self.left[k] -= 1
        if not self.left[k]:
            self.writers.pop(k).finish()
            self.progress.update("shard", self.names[k], 0)


def _rotation(spec: SyntheticSpec) -> torch.Tensor:
    """QuaRot's orthogonal [hidden, hidden] rotation (fp32), from torch's default generator's first draws."""
    return torch.linalg.qr(torch.randn(spec.hidden, spec.hidden, generator=torch.Generator()))[0].contiguous()


def _write(path: Path, layout: str, spec: SyntheticSpec, shard_bytes: int | None, progress: Progress) -> None:
    source = get_source(layout)
    blocks = [None, *_all_layers(spec, layout)]
    plans = _BlockPlans(spec, layout)
    total_bytes = sum(plans.nbytes(block) for block in blocks)
    shards = _cut_shards(plans, blocks, shard_bytes or math.ceil(total_bytes / spec.shards))
    prefix = shard_prefix(layout, spec)
    if _old_api_save(layout, spec):
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    files = _ShardFiles(path, names, shards, progress)
    progress.start(total_bytes, len(blocks) - 1)
    writes = _BackgroundWrites()
    try:
        for block in blocks:
            for tensors, _ in block_groups(spec, layout, block):
                for name, tensor in tensors.items():
                    writes.submit(_nbytes(tensor), files.write, name, tensor)
            if block is not None:
                writes.submit(0, progress.update, "module", f"layer {block}", 0)
        writes.drain()
    finally:
        writes.close()
    types = {p.entry.name: p.quant_type for planned in shards for p in planned}
    types = dict(sorted(types.items(), key=lambda kv: natural_key(kv[0])))
    if _old_api_save(layout, spec):  # one weight file, no index, no config.json, the description named for the type
        description = {"model_quant_type": "W4A8_DYNAMIC", **types}
        (path / "quant_model_description_w4a8_dynamic.json").write_text(json.dumps(description, indent=2))
        return
    weight_map = {p.entry.name: names[k] for k, planned in enumerate(shards) for p in planned}
    family = spec.model
    if family.rotation_file:  # GLM-5's QuaRot rotation: in the index, not in the description
        rotation = _rotation(spec)
        save_file({"rot.weight": rotation}, str(path / "rot.safetensors"), metadata={"format": "pt"})
        weight_map["rot.weight"] = "rot.safetensors"
        total_bytes += _nbytes(rotation)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
    }
    (path / f"{prefix}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))

    sizes = {"hidden_size": spec.hidden, family.intermediate_key: spec.intermediate}
    if family.intermediate_key != "intermediate_size":  # the dense layers' (MiniMax's is the experts')
        sizes["intermediate_size"] = 2 * spec.intermediate
    sizes[family.experts_key] = spec.experts
    sizes["first_k_dense_replace"] = spec.dense_layers
    sizes["num_hidden_layers"] = spec.dense_layers + spec.moe_layers
    sizes["vocab_size"] = spec.vocab
    if family.text_config:  # Qwen3.5: the language model's sizes under text_config
        config = {"architectures": [family.architecture], "model_type": family.model_type, "text_config": sizes}
    else:
        config = {"architectures": [family.architecture], "model_type": family.model_type, **sizes}
    config["torch_dtype"] = "bfloat16"
    if spec.style != "legacy":
        mtp = len(_all_layers(spec, layout)) - len(_decoder_layers(spec))
        (config.get("text_config") or config)["num_nextn_predict_layers"] = mtp
        if family.mtp_layer is not None and not family.text_config:
            config["n_mtp_layers"] = mtp  # DeepSeek-V4's own name for it

    if source.described_by_config:  # no description: config.json says what is quantized
        config["quantization_config"] = source.synthetic_description(spec.group_size)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    if source.described_by_config:
        return
    tensor_types = types
    layout_keys = source.synthetic_description(spec.group_size)
    if spec.style == "legacy" or not source.packed_on_disk:  # the old API: the type first
        description: dict[str, object] = {"model_quant_type": "W8A8_DYNAMIC", **layout_keys, **tensor_types}
    else:  # the CLI's ascend_v1 saver: tensors, then its keys (W4A8_DYNAMIC is never the model's type)
        optional = {}
        if spec.quarot and family.quarot:
            (path / "optional").mkdir()
            save_file({"global_rotation": _rotation(spec)}, str(path / "optional" / "quarot.safetensors"))
            optional["quarot"] = {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}
        (path / family.practice).write_text("# the practice msModelSlim ran\nquant_type: w4a8\n")
        description = {
            **tensor_types,
            "version": layout_keys.get("version", "1.0.0"),
            "model_quant_type": "W8A8_DYNAMIC",
            "metadata": {},
            "group_size": layout_keys.get("group_size", 0),
            "optional": optional,
        }
        if family.rotation_file:
            description["is_rot_used"] = True
    # Last: a directory with a description is complete (as the converter treats its output).
    (path / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
