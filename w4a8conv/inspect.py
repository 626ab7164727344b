"""``w4a8conv inspect``: what a checkpoint is and what is wrong with it, from headers alone."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import open_checkpoint
from .plan import build_plan


def inspect_checkpoint(path: Path | str) -> dict:
    """Describe a checkpoint from its description, index and safetensors headers (no tensor data).

    Returns:
        A JSON-ready dict with at least ``format``, ``group_size``, ``w4a8_modules``, ``moe_layers``,
        ``shards``, ``total_bytes`` and ``problems`` (every inconsistency found, one line each).

    Raises:
        BadInputError: when the directory cannot be read as a checkpoint at all.
    """
    ckpt = open_checkpoint(Path(path))
    plan = build_plan(ckpt)
    experts_per_layer = sorted({len(layer.experts) for layer in plan.moe_layers.values()})
    moe_shapes = {(layer.hidden_size, layer.intermediate_size) for layer in plan.moe_layers.values()}
    hidden, intermediate = moe_shapes.pop() if len(moe_shapes) == 1 else (None, None)
    return {
        "path": str(path),
        "format": plan.format,
        "version": ckpt.description.get("version"),
        "group_size": plan.group_size,
        "w4a8_modules": plan.w4a8_modules,
        "w4a8_linear": plan.w4a8_linear,
        "moe_layers": len(plan.moe_layers),
        "experts": plan.num_experts,
        "experts_per_layer": experts_per_layer[0] if len(experts_per_layer) == 1 else experts_per_layer,
        "hidden_size": hidden or None,
        "moe_intermediate_size": intermediate or None,
        "other_quant_types": dict(sorted(plan.other_quant_types.items())),
        "params_dtype": ckpt.params_dtype_name,
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "total_bytes": ckpt.total_bytes,
        "converted_bytes": plan.output_bytes if plan.projections else None,
        "problems": plan.problems,
    }
