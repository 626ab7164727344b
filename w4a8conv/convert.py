"""The conversion pipeline: plan, check, then stream every output shard to disk.

It owns the file I/O and the order of work; the math lives in ``processing``. Memory stays at one
projection's tensors: pass-through tensors are copied file to file, processed tensors are written
at their planned offsets, and no shard is assembled in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import DESCRIPTION_FILE, INDEX_SUFFIX, Checkpoint, open_checkpoint
from .devices import resolve_device
from .errors import BadInputError
from .layouts import PREPACKED_TYPE, PROCESSED_FORMAT
from .output import Progress
from .plan import TOOL_SECTION, Plan, Projection, build_plan, natural_key, tensor_entries
from .processing import process_projection
from .safetensors_io import ShardWriter, read_tensor

FORMAT_VERSION = 1


@dataclass
class ConvertResult:
    out_dir: Path
    format: str
    group_size: int | None
    modules: int
    moe_layers: int
    experts: int
    shards: int
    input_bytes: int
    output_bytes: int
    seconds: float
    device: str

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


def check_paths(src: Path, dst: Path) -> None:
    """Refuse an output that is, holds or sits inside the input, or that already has files in it."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents or real_dst in real_src.parents:
        raise BadInputError(f"--out {dst}: must not be, contain or lie inside --in {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise BadInputError(f"--out {dst}: exists and is not an empty directory; choose a new one")


def prepare(src: Path) -> tuple[Checkpoint, Plan]:
    """Read and plan ``src``; raise on the first problem (``inspect`` lists them all)."""
    ckpt = open_checkpoint(src)
    plan = build_plan(ckpt)
    if plan.format == PROCESSED_FORMAT:
        raise BadInputError(f"{src}: already processed by w4a8conv; nothing to convert")
    if plan.problems:
        more = len(plan.problems) - 1
        suffix = f" (and {more} more; run `w4a8conv inspect {src}` for all)" if more else ""
        raise BadInputError(plan.problems[0] + suffix)
    return ckpt, plan


def convert_checkpoint(
    src: Path | str,
    dst: Path | str,
    device: str = "cpu",
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into a processed one.

    Args:
        src: the input checkpoint directory; never written to.
        dst: the output directory; created, must not exist or be empty.
        device: ``cpu`` (default), ``cuda``, ``npu`` or ``auto``.
        progress: called as work is done, for progress display.

    Returns:
        A summary of what was converted.

    Raises:
        BadInputError: the input is wrong (nothing is written when this is found while planning).
        W4A8ConvError: the conversion failed; the output lacks its index and description, so it
            does not look complete.
    """
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    ckpt, plan = prepare(src)
    torch_device = resolve_device(device)
    dst.mkdir(parents=True, exist_ok=True)
    report = progress or Progress()
    report.start(sum(t.nbytes for t in ckpt.tensors.values()), len(plan.projections))

    try:
        for rel in ckpt.extra_files:
            _copy_file(ckpt.root / rel, dst / rel)
        by_shard: dict[str, list[Projection]] = {}
        for projection in plan.projections:
            by_shard.setdefault(projection.shard, []).append(projection)
        params_dtype = ckpt.params_dtype
        for shard_name, entries in plan.shard_entries.items():
            report.update("shard", shard_name, 0)
            writer = ShardWriter(
                dst / shard_name, entries, metadata={"format": "pt", "converted_by": f"w4a8conv {__version__}"}
            )
            try:
                for info in (t for t in plan.passthrough if t.path.name == shard_name):
                    writer.copy_tensor(info.name, info)
                    report.update("copy", info.name, info.nbytes)
                for projection in by_shard.get(shard_name, []):
                    _convert_projection(writer, projection, torch_device, params_dtype)
                    report.update("module", projection.prefix, sum(i.nbytes for i in projection.sources.values()))
                writer.finish()
            finally:
                writer.abort()

        index = {
            "metadata": {"total_size": plan.output_bytes},
            "weight_map": dict(
                sorted(
                    ((entry.name, shard) for shard, entries in plan.shard_entries.items() for entry in entries),
                    key=lambda kv: natural_key(kv[0]),
                )
            ),
        }
        _write_json(dst / f"{ckpt.prefix}{INDEX_SUFFIX}", index)
        _write_json(dst / DESCRIPTION_FILE, processed_description(ckpt, plan, str(torch_device)))
    finally:
        report.finish()
    return ConvertResult(
        out_dir=dst,
        format=plan.format,
        group_size=plan.group_size,
        modules=len(plan.projections),
        moe_layers=len(plan.moe_layers),
        experts=plan.num_experts,
        shards=len(plan.shard_entries),
        input_bytes=ckpt.total_bytes,
        output_bytes=plan.output_bytes,
        seconds=time.monotonic() - started,
        device=str(torch_device),
    )


def _convert_projection(writer: ShardWriter, projection: Projection, device: torch.device, params_dtype) -> None:
    tensors = {role: read_tensor(info).to(device) for role, info in projection.sources.items()}
    for name, tensor in process_projection(projection, tensors, params_dtype).items():
        writer.write_tensor(name, tensor)


def processed_description(ckpt: Checkpoint, plan: Plan, device: str) -> dict:
    """The source description with processed tensors re-typed and a section recording what was done."""
    consumed = {info.name for p in plan.projections for info in p.sources.values()}
    entries = tensor_entries(ckpt.description)
    description = {k: v for k, v in ckpt.description.items() if k not in entries}
    description["group_size"] = plan.group_size
    for name, quant_type in entries.items():
        if name not in consumed:
            description[name] = quant_type
    for projection in plan.projections:
        for entry in projection.outputs():
            description[entry.name] = PREPACKED_TYPE
    description[TOOL_SECTION] = {
        "tool": "w4a8conv",
        "tool_version": __version__,
        "format_version": FORMAT_VERSION,
        "source_layout": plan.format,
        "source_version": ckpt.description.get("version"),
        "group_size": plan.group_size,
        "quant_type": PREPACKED_TYPE,
        "params_dtype": str(ckpt.params_dtype).removeprefix("torch."),
        "target": "vllm-ascend 0.23 process_weights_after_loading",
        "scale_bias": "float32 [out, chunks]; a tensor-parallel rank sums the chunks of its input slice",
        "device": device,
    }
    return dict(sorted(description.items(), key=lambda kv: natural_key(kv[0])))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
