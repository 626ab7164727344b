"""Serving side: load the operator tensors of a processed checkpoint, with nothing left to compute.

A processed checkpoint stores each W4A8 projection (every expert's gate/up/down, every Linear) in the
operator's orientation already. Loading a MoE layer only slices a tensor-parallel rank's share,
concatenates gate and up into w13, stacks the experts, and sums the rank's scale_bias chunks.
The results have the names, dtypes and shapes vllm-ascend 0.23 holds after
``process_weights_after_loading``.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import BadInputError
from ..experts import ExpertNaming, parse_expert
from ..formats.scales import sum_scale_bias_chunks
from ..formats.sources import get_source
from ..names import (
    DESCRIPTION_FILE,
    INDEX_SUFFIX,
    MAX_MOE_TP,
    TOOL_SECTION,
    format_problem,
)


class ProcessedCheckpoint:
    """A checkpoint written by ``w4a8conv convert``: its index, description and tensors.

    Args:
        path: the checkpoint directory.

    Example:
        >>> ckpt = ProcessedCheckpoint("out/")  # doctest: +SKIP
        >>> ckpt.load_moe("model.layers.3.mlp.experts")["w13_weight"].dtype  # doctest: +SKIP
        torch.int32
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        description_path = self.path / DESCRIPTION_FILE
        try:
            self.description = json.loads(description_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInputError(f"{description_path}: cannot read the description ({e})") from e
        section = self.description.get(TOOL_SECTION) if isinstance(self.description, dict) else None
        problem = format_problem(section)
        if problem is not None:
            raise BadInputError(f"{description_path}: {problem}")
        self.section = section
        self.target: str | None = section.get("target") if section.get("format_version", 1) >= 2 else None
        self.group_size: int = section["group_size"]
        self.source_layout: str = section["source_layout"]
        indexes = sorted(self.path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) != 1:
            raise BadInputError(f"{self.path}: expected one {INDEX_SUFFIX} file, found {len(indexes)}")
        self.weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]

    def tensors(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors by name, opening each shard once."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise BadInputError(f"{self.path}: no tensor {missing[0]} in the index")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            for file_name, file_names in by_file.items():
                f = stack.enter_context(safe_open(str(self.path / file_name), framework="pt", device=str(device)))
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def experts(self, prefix: str) -> list[int]:
        """The experts' numbers under ``prefix`` (whose gate projection the checkpoint holds)."""
        return sorted(self._experts(prefix)[0])

    def _experts(self, prefix: str) -> tuple[set[int], ExpertNaming]:
        found: dict[int, ExpertNaming] = {}
        for name in self.weight_map:
            expert = parse_expert(name[: -len(".weight")]) if name.endswith(".weight") else None
            if expert is not None and expert.layer == prefix and expert.role == "gate":
                found[expert.expert] = expert.naming
        namings = set(found.values())
        if not found:
            raise BadInputError(f"{self.path}: no experts under {prefix}")
        if len(namings) > 1:
            raise BadInputError(f"{self.path}: experts under {prefix} mix the namings of {len(namings)} families")
        return set(found), namings.pop()

    def load_moe(
        self,
        prefix: str,
        tp_size: int = 1,
        tp_rank: int = 0,
        device: str | torch.device = "cpu",
        experts: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The fused MoE tensors of one layer for one tensor-parallel rank.

        Args:
            prefix: the experts' prefix, e.g. ``model.layers.3.mlp.experts`` (``layers.3.ffn.experts``
                for DeepSeek-V4: the checkpoint's own names, whichever naming of ``w4a8conv.experts``).
            tp_size: MoE tensor-parallel size; 1 for expert parallelism (every expert whole).
            tp_rank: this rank, ``0 <= tp_rank < tp_size``.
            device: where the tensors are loaded.
            experts: load only these experts, in this order (an expert-parallel rank's share);
                all by default.

        Returns:
            ``w13_weight`` int32 ``[E, H, 2I/tp/8]``, ``w2_weight`` int32 ``[E, I/tp, H/8]``,
            ``w13_weight_scale`` int64 ``[E, H/g, 2I/tp]`` (per-channel ``[E, 2I/tp]``),
            ``w2_weight_scale`` int64 ``[E, I/tp/g, H]`` (per-channel ``[E, 1, H]``),
            ``w13_scale_bias`` float32 ``[E, 2I/tp]``, ``w2_scale_bias`` float32 ``[E, H]``.
        """
        if not 1 <= tp_size <= MAX_MOE_TP or not 0 <= tp_rank < tp_size:
            raise BadInputError(f"tp_size {tp_size} / tp_rank {tp_rank}: need 1 <= tp_size <= 16, 0 <= rank < size")
        numbers, naming = self._experts(prefix)
        available = sorted(numbers)
        gate, up, down = naming.gate, naming.up, naming.down
        missing = sorted(set(experts or []) - set(available))
        if missing:
            raise BadInputError(f"{self.path}: no expert {missing[0]} under {prefix}")
        experts = available if experts is None else experts
        per_group = self.group_size > 0
        names = [
            f"{prefix}.{e}.{proj}.{role}"
            for e in experts
            for proj in (gate, up, down)
            for role in ("weight", "weight_scale", "scale_bias")
        ]
        t = self.tensors(names, device)
        w13, w2, s13, s2, b13, b2 = [], [], [], [], [], []
        for e in experts:
            p = f"{prefix}.{e}"
            inter = t[f"{p}.{gate}.scale_bias"].shape[0]
            cols = _rank_range(inter, tp_size, tp_rank, 8, f"{p}: moe_intermediate {inter}")
            w13.append(torch.cat([t[f"{p}.{x}.weight"][:, cols.start // 8 : cols.stop // 8] for x in (gate, up)], -1))
            s13.append(torch.cat([t[f"{p}.{x}.weight_scale"][:, cols] for x in (gate, up)], -1))
            b13.append(torch.cat([t[f"{p}.{x}.scale_bias"][cols] for x in (gate, up)]))
            w2.append(t[f"{p}.{down}.weight"][cols])
            if per_group:
                g = self.group_size
                _rank_range(inter, tp_size, tp_rank, g, f"{p}: moe_intermediate {inter} with group_size {g}")
                s2.append(t[f"{p}.{down}.weight_scale"][cols.start // g : cols.stop // g])
            else:
                s2.append(t[f"{p}.{down}.weight_scale"])
            chunks = t[f"{p}.{down}.scale_bias"]
            mine = _rank_range(chunks.shape[1], tp_size, tp_rank, 1, f"{p}.{down}.scale_bias chunks")
            b2.append(chunks[:, mine])
        w13_scale = torch.stack(s13)
        return {
            "w13_weight": torch.stack(w13),
            "w2_weight": torch.stack(w2),
            "w13_weight_scale": w13_scale if per_group else w13_scale.squeeze(1),
            "w2_weight_scale": torch.stack(s2),
            "w13_scale_bias": sum_scale_bias_chunks(torch.stack(b13)),
            "w2_scale_bias": sum_scale_bias_chunks(torch.stack(b2)),
        }

    def load_linear(self, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of one W4A8 Linear (whole, tensor parallel size 1).

        Args:
            prefix: the Linear's prefix, e.g. ``model.layers.0.self_attn.o_proj``.
            device: where the tensors are loaded.

        Returns:
            ``weight`` int32 ``[in, out/8]``, ``weight_scale_second`` float32 ``[in/g, out]`` (the
            antiquant scale), and the bias under upstream's name: ``weight_scale_bias`` float32
            ``[out]`` for a mindie source; ``scale_bias`` float32 ``[out]`` or ``[out, 16]`` for 1.0.0.
        """
        t = self.tensors([f"{prefix}.weight", f"{prefix}.weight_scale_second", f"{prefix}.scale_bias"], device)
        bias = t[f"{prefix}.scale_bias"]
        out = {"weight": t[f"{prefix}.weight"], "weight_scale_second": t[f"{prefix}.weight_scale_second"]}
        if not get_source(self.source_layout).stores_scale_bias:  # upstream computes weight_scale_bias
            out["weight_scale_bias"] = bias.sum(-1)
        else:
            out["scale_bias"] = bias.flatten() if bias.shape[1] == 1 else bias
        return out


def _rank_range(size: int, tp_size: int, tp_rank: int, multiple: int, what: str) -> slice:
    share = size // tp_size
    if size % tp_size or share % multiple:
        raise BadInputError(f"{what} does not split into {tp_size} shares of a multiple of {multiple}")
    return slice(tp_rank * share, (tp_rank + 1) * share)


def load_moe(
    path: Path | str, prefix: str, tp_size: int = 1, tp_rank: int = 0, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load one MoE layer's operator tensors; see :meth:`ProcessedCheckpoint.load_moe`.

    Example:
        >>> t = load_moe("out/", "model.layers.3.mlp.experts")  # doctest: +SKIP
        >>> t["w13_weight"].shape  # [E, H, 2I/8]  # doctest: +SKIP
    """
    return ProcessedCheckpoint(path).load_moe(prefix, tp_size, tp_rank, device)


def load_linear(path: Path | str, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load one W4A8 Linear's operator tensors; see :meth:`ProcessedCheckpoint.load_linear`.

    Example:
        >>> t = load_linear("out/", "model.layers.0.self_attn.o_proj")  # doctest: +SKIP
        >>> t["weight"].dtype  # doctest: +SKIP
        torch.int32
    """
    return ProcessedCheckpoint(path).load_linear(prefix, device)
