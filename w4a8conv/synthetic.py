"""Tiny synthetic msModelSlim checkpoints in every layout, for the demo and the tests.

A DeepSeek-like model: dense layers first, then MoE layers whose routed experts are W4A8_DYNAMIC,
attention and shared experts W8A8_DYNAMIC, router and norms FLOAT. Every source layout is written
from the same int4 values and scales (:func:`w4a8_truth`), so their conversions can be compared;
each layout's module encodes them (``SourceLayout.synthetic_tensors``), from W4A8_FORMATS.md and
independently of ``w4a8conv.packing``, so the tests do not check the packing against itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .names import DESCRIPTION_FILE, INDEX_SUFFIX, W4A8_TYPE, natural_key
from .output import Progress
from .sources import get_source

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
    style: str = "msmodelslim"  # see STYLES
    mtp_layers: int = 1  # DeepSeek's multi-token-prediction layer: experts named like W4A8's, typed W8A8_DYNAMIC
    quarot: bool = True  # msModelSlim's QuaRot: a global rotation in optional/quarot.safetensors

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r}: one of {', '.join(STYLES)}")


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
    return range(spec.dense_layers + spec.moe_layers + mtp)


def _attention(spec: SyntheticSpec) -> tuple[str, str]:
    """The attention projections that may be W4A8 Linear: MLA's q_b_proj and o_proj (legacy: q_proj)."""
    return ("q_proj", "o_proj") if spec.style == "legacy" else ("q_b_proj", "o_proj")


def _w4a8_prefixes(spec: SyntheticSpec, layout: str, layers: Iterable[int]) -> list[tuple[str, int, int, bool]]:
    """(prefix, out, in, row_parallel) of every W4A8 projection in ``layers``."""
    h, i = spec.hidden, spec.intermediate
    out = []
    for layer in layers:
        base = f"model.layers.{layer}"
        if layer not in _decoder_layers(spec):
            continue  # an MTP layer: its experts are W8A8
        if spec.w4a8_linear and get_source(layout).synthetic_linear:
            column, row = _attention(spec)
            out.append((f"{base}.self_attn.{column}", h, h, False))
            out.append((f"{base}.self_attn.{row}", h, h, True))
        if layer >= spec.dense_layers:
            for e in range(spec.experts):
                p = f"{base}.mlp.experts.{e}"
                out += [(f"{p}.gate_proj", i, h, False), (f"{p}.up_proj", i, h, False), (f"{p}.down_proj", h, i, True)]
    return out


def w4a8_truth(
    spec: SyntheticSpec, layout: str = "mindie", layers: Iterable[int] | None = None
) -> dict[str, W4A8Truth]:
    """The int4 values and scales of every W4A8 projection, identical for every layout."""
    result = {}
    for prefix, n, k, row_parallel in _w4a8_prefixes(spec, layout, _decoder_layers(spec) if layers is None else layers):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{spec.seed}:{prefix}".encode()))
        values = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        weight_scale = torch.rand(n, 1, generator=gen) * 0.02 + 0.001
        second = torch.rand(n, k // spec.group_size, generator=gen) * 1.5 + 0.25
        result[prefix] = W4A8Truth(values, weight_scale, second, row_parallel)
    return result


def _old_api_save(layout: str, spec: SyntheticSpec) -> bool:
    """msModelSlim's old llm_ptq API saving mindie without ``part_file_size``: one file, as it writes it."""
    return layout == "mindie" and spec.style != "legacy" and spec.shards == 1


def _write_old_api_save(path: Path, prefix: str, files: list, types: dict[str, str]) -> Path:
    """One weight file, no index, no config.json, the description named after the quant type."""
    (temp, _), *more = files
    assert not more, "one file, so one shard"
    temp.rename(path / f"{prefix}.safetensors")
    description = {"model_quant_type": "W4A8_DYNAMIC", **dict(sorted(types.items(), key=lambda kv: natural_key(kv[0])))}
    (path / "quant_model_description_w4a8_dynamic.json").write_text(json.dumps(description, indent=2))
    return path


def _kind(spec: SyntheticSpec, block: int | None) -> str:
    if block is None:
        return "outside"
    if block < spec.dense_layers:
        return "dense"
    return "moe" if block < spec.dense_layers + spec.moe_layers else "mtp"


def block_bytes(spec: SyntheticSpec, layout: str) -> dict[int | None, int]:
    """The shard bytes of every block (``None``: the tensors outside the layers); every dense, MoE or MTP
    layer has the same size as the others of its kind, so one of each is generated to measure."""
    blocks = [None, *_all_layers(spec, layout)]
    measured: dict[str, int] = {}
    for block in blocks:
        kind = _kind(spec, block)
        if kind not in measured:
            measured[kind] = sum(_nbytes(t) for t in build_tensors(spec, layout, block)[0].values())
    return {block: measured[_kind(spec, block)] for block in blocks}


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


def build_tensors(
    spec: SyntheticSpec, layout: str, layer: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one decoder layer (or, with ``layer=None``, those outside the layers) and their types."""
    source = get_source(layout)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{spec.seed}:{layer}".encode()))
    h, i, e = spec.hidden, spec.intermediate, spec.experts
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}

    def add(group: dict[str, torch.Tensor], quant_type: str) -> None:
        tensors.update(group)
        types.update(dict.fromkeys(group, quant_type))

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    if layer is None:
        add({"model.embed_tokens.weight": bf16(spec.vocab, h)}, "FLOAT")
        add({"model.norm.weight": bf16(h), "lm_head.weight": bf16(spec.vocab, h)}, "FLOAT")
        return tensors, types
    truth = w4a8_truth(spec, layout, [layer])
    for prefix, t in truth.items():
        add(
            source.synthetic_tensors(prefix, t.values, t.weight_scale, t.weight_scale_second, t.row_parallel), W4A8_TYPE
        )
    base = f"model.layers.{layer}"
    add({f"{base}.input_layernorm.weight": bf16(h), f"{base}.post_attention_layernorm.weight": bf16(h)}, "FLOAT")
    if spec.style == "legacy":
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{base}.self_attn.{proj}" not in truth:
                add(source.synthetic_w8a8(f"{base}.self_attn.{proj}", h, h, gen), "W8A8_DYNAMIC")
    else:
        _add_mla_attention(spec, source, f"{base}.self_attn", truth, gen, add)
    if layer < spec.dense_layers:
        for proj, n, k in (("gate_proj", 2 * i, h), ("up_proj", 2 * i, h), ("down_proj", h, 2 * i)):
            add(source.synthetic_w8a8(f"{base}.mlp.{proj}", n, k, gen), "W8A8_DYNAMIC")
        return tensors, types
    # DeepSeek's router bias: fp32 in the legacy style, in the model dtype as msModelSlim leaves it
    router = bf16(e, h)
    bias = torch.randn(e, generator=gen)
    add({f"{base}.mlp.gate.weight": router}, "FLOAT")
    add({f"{base}.mlp.gate.e_score_correction_bias": bias if spec.style == "legacy" else bias.bfloat16()}, "FLOAT")
    for proj, n, k in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
        add(source.synthetic_w8a8(f"{base}.mlp.shared_experts.{proj}", n, k, gen), "W8A8_DYNAMIC")
    if layer not in _decoder_layers(spec):  # an MTP layer: W8A8 experts under W4A8-like names, and its own parts
        for expert in range(e):
            for proj, n, k in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                add(source.synthetic_w8a8(f"{base}.mlp.experts.{expert}.{proj}", n, k, gen), "W8A8_DYNAMIC")
        add({f"{base}.{name}.weight": bf16(h) for name in ("enorm", "hnorm", "shared_head.norm")}, "FLOAT")
        add({f"{base}.eh_proj.weight": bf16(h, 2 * h)}, "FLOAT")
    return tensors, types


def _add_mla_attention(spec, source, prefix: str, truth: dict, gen: torch.Generator, add) -> None:
    """DeepSeek's multi-head latent attention as msModelSlim quantizes it: W8A8 static projections (with
    input_scale, input_offset, deq_scale and quant_bias; deq_scale stays fp32 for a bf16 model), kv_b_proj
    and the norms left in bf16. A compressed-tensors checkpoint holds its W8A8 (dynamic) under the same names."""
    h = spec.hidden
    for proj in MLA_PROJECTIONS:
        name = f"{prefix}.{proj}"
        if name in truth:
            continue
        if proj == "kv_b_proj" and not source.described_by_config:
            add({f"{name}.weight": torch.randn(h, h, generator=gen).to(torch.bfloat16)}, "FLOAT")
        elif source.described_by_config:
            add(source.synthetic_w8a8(name, h, h, gen), "W8A8_DYNAMIC")
        else:
            add(
                {
                    f"{name}.weight": torch.randint(-128, 128, (h, h), generator=gen, dtype=torch.int8),
                    f"{name}.quant_bias": torch.randint(-1000, 1000, (h,), generator=gen, dtype=torch.int32),
                    f"{name}.input_scale": torch.rand(1, generator=gen) * 0.05,
                    f"{name}.input_offset": torch.zeros(1),
                    f"{name}.deq_scale": torch.rand(h, generator=gen) * 1e-4,
                },
                "W8A8",
            )
    norms = {
        f"{prefix}.{norm}.weight": torch.randn(h, generator=gen).to(torch.bfloat16)
        for norm in ("q_a_layernorm", "kv_a_layernorm")
    }
    add(norms, "FLOAT")


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


def _write(path: Path, layout: str, spec: SyntheticSpec, shard_bytes: int | None, progress: Progress) -> None:
    source = get_source(layout)
    blocks = [None, *_all_layers(spec, layout)]
    sizes = block_bytes(spec, layout)
    if shard_bytes is None:
        shard_bytes = math.ceil(sum(sizes.values()) / spec.shards)
    progress.start(sum(sizes.values()), len(blocks))
    types: dict[str, str] = {}
    files: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0  # counted as tensors come: summing the pending ones each time was quadratic

    def flush() -> None:
        nonlocal pending_bytes, total_bytes
        temp = path / f"shard-{len(files)}.tmp"
        save_file(pending, str(temp), metadata={"format": "pt"})
        files.append((temp, list(pending)))
        total_bytes += pending_bytes
        pending.clear()
        pending_bytes = 0
        progress.update("shard", f"shard {len(files)}", 0)

    for block in blocks:
        tensors, block_types = build_tensors(spec, layout, block)
        types.update(block_types)
        for name in sorted(tensors, key=natural_key):
            pending[name] = tensors[name].contiguous()
            pending_bytes += _nbytes(pending[name])
            if pending_bytes >= shard_bytes:
                flush()
        progress.update("module", f"layer {block}", sizes[block])
    if pending:
        flush()
    prefix = shard_prefix(layout, spec)
    if _old_api_save(layout, spec):
        _write_old_api_save(path, prefix, files, types)
        return
    weight_map = {}
    for n, (temp, names) in enumerate(files, start=1):
        file_name = f"{prefix}-{n:05d}-of-{len(files):05d}.safetensors"
        temp.rename(path / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
    }
    (path / f"{prefix}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))

    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": spec.hidden,
        "moe_intermediate_size": spec.intermediate,
        "intermediate_size": 2 * spec.intermediate,
        "n_routed_experts": spec.experts,
        "first_k_dense_replace": spec.dense_layers,
        "num_hidden_layers": spec.dense_layers + spec.moe_layers,
        "vocab_size": spec.vocab,
        "torch_dtype": "bfloat16",
    }
    if spec.style != "legacy":
        config["num_nextn_predict_layers"] = len(_all_layers(spec, layout)) - len(_decoder_layers(spec))

    if source.described_by_config:  # no description: config.json says what is quantized
        config["quantization_config"] = source.synthetic_description(spec.group_size)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    if source.described_by_config:
        return
    tensor_types = dict(sorted(types.items(), key=lambda kv: natural_key(kv[0])))
    layout_keys = source.synthetic_description(spec.group_size)
    if spec.style == "legacy" or not source.packed_on_disk:  # the old API: the type first
        description: dict[str, object] = {"model_quant_type": "W8A8_DYNAMIC", **layout_keys, **tensor_types}
    else:  # the CLI's ascend_v1 saver: tensors, then its keys (W4A8_DYNAMIC is never the model's type)
        optional = {}
        if spec.quarot:
            rotation = torch.linalg.qr(torch.randn(spec.hidden, spec.hidden, generator=torch.Generator()))[0]
            (path / "optional").mkdir()
            save_file({"global_rotation": rotation.contiguous()}, str(path / "optional" / "quarot.safetensors"))
            optional["quarot"] = {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}
        (path / "DeepSeek-V3_best_practice.yaml").write_text("# the practice msModelSlim ran\nquant_type: w4a8\n")
        description = {
            **tensor_types,
            "version": layout_keys.get("version", "1.0.0"),
            "model_quant_type": "W8A8_DYNAMIC",
            "metadata": {},
            "group_size": layout_keys.get("group_size", 0),
            "optional": optional,
        }
    # Last: a directory with a description is complete (as the converter treats its output).
    (path / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
