"""``w4a8conv check-engine OUT``: the plugin's canary comparison on the installed engine, for each parallel
layout, without starting an engine or building a model.

For each layout and rank it does what the plugin does when a server loads the checkpoint's first MoE layer
(and its W4A8 Linear): the plugin's method is built (its own refusals: MoE tensor-parallel sizes, groups
per rank, dtype, mix_placement, the MoE loader's scale_bias chunks), the layer vLLM keeps MoE weights on
(FusedMoE in 0.23, RoutedExperts from 0.24; and Linear layers) is made for the rank, and
:func:`~.canary_check.check_moe` (:func:`~.canary_check.check_linear`), the one implementation the plugin
runs at load, compares the engine's own W4A8 processing of the canary's source tensors, loaded through
vLLM's own weight loaders, with the plugin's path on the converted tensors. Nothing else of the model is
read: the canary holds one expert (and one Linear).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import BadInputError
from ...experts import parse_expert
from ...names import DESCRIPTION_FILE, INDEX_SUFFIX, PREPACKED_TYPE, ROW_PARALLEL, TOOL_SECTION
from ...names import format_problem as section_problem


@dataclass(frozen=True)
class Layout:
    """One parallel layout a server may run: MoE tensor parallelism ``size``, or expert parallelism over
    ``size`` ranks (then MoE tensor parallelism is 1), with dynamic EPLB or MegaMoE on."""

    size: int = 1
    expert_parallel: bool = False
    dynamic_eplb: bool = False
    mega_moe: bool = False

    @property
    def label(self) -> str:
        words = [f"expert parallel {self.size}" if self.expert_parallel else f"MoE tp {self.size}"]
        words += ["dynamic EPLB"] if self.dynamic_eplb else []
        words += ["MegaMoE"] if self.mega_moe else []
        return ", ".join(words)

    @property
    def moe_tp(self) -> int:
        return 1 if self.expert_parallel else self.size


# What a user could pick: every MoE tensor-parallel size the 16 scale_bias chunks allow, and expert parallelism.
DEFAULT_LAYOUTS = (*(Layout(size) for size in (1, 2, 4, 8, 16)), Layout(16, expert_parallel=True))


@dataclass
class Verdict:
    """One layout at one rank: serves (the engine computes what the checkpoint holds) or refused, and why."""

    layout: str
    rank: int
    serves: bool
    seconds: float
    checked: list[str]  # what the canary compared: "MoE expert ...", "Linear ..."
    reason: str | None = None  # the plugin's one-line refusal
    note: str | None = None  # what was checked differs from what was asked (MegaMoE off here)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.serves, **asdict(self)}


class CannotDrive(BadInputError):
    """The installed engine cannot be driven here (not installed, or a release check-engine does not drive)."""


def check_engine(
    out: Path, layouts: tuple[Layout, ...] = DEFAULT_LAYOUTS, rank: int | None = None
) -> tuple[str | None, list[Verdict]]:
    """Run the plugin's canary comparison on the installed engine for every layout (at ``rank``, else at
    its first and last rank): the engine's version and one verdict each. The layers are made on the NPU
    where there is one (:func:`serving_device`), else on the CPU.

    Raises:
        BadInputError: ``out`` is no w4a8conv output with a canary, or a layout or rank is impossible.
        CannotDrive: the installed engine cannot be driven here; the line says why.
    """
    from . import canary_check, register, sandbox
    from .api import detect_api

    description = _processed_description(out)
    section = description[TOOL_SECTION]
    for layout in layouts:
        if layout.size < 1:
            raise BadInputError(f"--tp {layout.size}: must be positive")
        if rank is not None and not 0 <= rank < layout.size:
            raise BadInputError(f"--rank {rank}: need 0 <= rank < {layout.size} for {layout.label}")
    problem = sandbox.driveable()
    if problem is not None:
        raise CannotDrive(f"check-engine: {problem}")
    api = detect_api()
    if api.release not in ("registry", "registry-moe-only"):
        raise CannotDrive(
            f"check-engine: vllm-ascend {api.version} ({api.release} release) runs no canary comparison: the "
            "plugin checks its version string only there"
        )
    register()
    shapes = _canary_shapes(out, section["canary"])
    dtype = _torch_dtype(section.get("params_dtype", "bfloat16"))
    device = serving_device()
    verdicts = []
    for layout in layouts:
        for r in [rank] if rank is not None else sorted({0, layout.size - 1}):
            state = sandbox.Serving(
                description=description,
                model=str(out),
                tp_size=layout.size,
                expert_parallel=layout.expert_parallel,
                dynamic_eplb=layout.dynamic_eplb,
                mega_moe=layout.mega_moe,
                on_npu=device == "npu",
            )
            started = time.monotonic()
            checked: list[str] = []
            note = None
            with sandbox.serving(state), _default_device(device):
                canary_check.forget()
                try:
                    if layout.mega_moe and not api.mega_moe():
                        note = "MegaMoE is off here, as the engine decides it: checked without it"
                    if "moe" in shapes:
                        _check_moe(layout, r, shapes, dtype, checked)
                    if shapes.get("linear") is not None and api.linear_method is not None:
                        _check_linear(layout, r, shapes["linear"], dtype, checked)
                    reason = None
                except ValueError as refusal:  # the plugin's refusals and the canary's
                    reason = str(refusal)
                except Exception as e:  # this engine asks for more than the sandbox answers
                    raise CannotDrive(
                        f"check-engine: cannot drive vllm-ascend {api.version} here ({layout.label}, rank {r}): "
                        f"{type(e).__name__}: {e}"
                    ) from e
                finally:
                    canary_check.forget()
            seconds = round(time.monotonic() - started, 2)
            verdicts.append(Verdict(layout.label, r, reason is None, seconds, checked, reason, note))
    return api.version, verdicts


def _check_moe(layout: Layout, rank: int, shapes: dict, dtype: Any, checked: list[str]) -> None:
    from vllm_ascend.quantization.methods import registry

    from . import canary_check, sandbox

    method = registry.get_scheme_class(PREPACKED_TYPE, "moe")()
    hidden, intermediate = shapes["moe"]
    # This rank's first local expert takes the canary: under expert parallelism the rank's own expert.
    experts, local = (layout.size, [rank]) if layout.expert_parallel else (1, [0])
    layer = sandbox.loader_only_fused_moe(
        method, (experts, hidden, intermediate), local, layout.moe_tp, 0 if layout.expert_parallel else rank, dtype
    )
    if method.canary is None:
        raise ValueError("w4a8conv: the plugin ran no canary comparison (W4A8CONV_SKIP_CANARY is set)")
    checked.append(
        canary_check.check_moe(method.canary, method.engine_method, layer, method.canary_shape, method.process)
    )


def _check_linear(layout: Layout, rank: int, linear: tuple[str, int, int], dtype: Any, checked: list[str]) -> None:
    from vllm_ascend.quantization.methods import registry

    from . import canary_check, sandbox

    kind, in_features, out_features = linear
    method = registry.get_scheme_class(PREPACKED_TYPE, "linear")()
    layer = sandbox.loader_only_linear(kind, method, in_features, out_features, layout.size, rank, dtype)
    if method.canary is None or not canary_check.linear_canary_matches(method.canary, layer):
        return
    checked.append(
        canary_check.check_linear(method.canary, method.engine_method, layer, method.params_dtype, method.process)
    )


def serving_device() -> str:
    """Where the check runs: the NPU where torch_npu sees one (the storage formats are then compared too),
    else the CPU (NZ is then a storage format only, and values are compared)."""
    import torch

    npu = getattr(torch, "npu", None)
    try:
        return "npu" if npu is not None and npu.is_available() and npu.device_count() > 0 else "cpu"
    except Exception:  # a torch_npu without CANN's runtime
        return "cpu"


def _default_device(device: str) -> Any:
    import torch

    return torch.device(device)


def _processed_description(out: Path) -> dict:
    path = out / DESCRIPTION_FILE
    if not path.is_file():
        raise BadInputError(f"{out}: no {DESCRIPTION_FILE}; check-engine reads a finished w4a8conv output")
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read ({e})") from None
    section = description.get(TOOL_SECTION) if isinstance(description, dict) else None
    problem = section_problem(section)
    if problem is not None:
        raise BadInputError(f"{path}: {problem}")
    if not isinstance(section.get("canary"), dict):
        raise BadInputError(
            f"{path}: no canary recorded (converted before w4a8conv wrote one); convert it again to check an engine"
        )
    return description


def _canary_shapes(out: Path, spec: dict) -> dict:
    """hidden and moe_intermediate of the canary expert, and (row or column, in, out) of its Linear, from
    the converted weights' shapes in the shards' headers."""
    from ...safetensors_io import read_header

    indexes = sorted(out.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) != 1:
        raise BadInputError(f"{out}: expected one {INDEX_SUFFIX} file, found {len(indexes)}")
    weight_map = json.loads(indexes[0].read_text())["weight_map"]

    def shape(name: str) -> tuple[int, ...]:
        if name not in weight_map:
            raise BadInputError(f"{indexes[0]}: no tensor {name}, which the canary record names")
        return read_header(out / weight_map[name]).tensors[name].shape

    shapes: dict[str, Any] = {"linear": None}
    if spec.get("moe_layer") is not None:
        prefix = f"{spec['moe_layer']}.{spec['expert']}"
        gate = next(parse_expert(n.rsplit(".", 1)[0]) for n in spec["tensors"] if n.startswith(prefix + "."))
        words = shape(f"{prefix}.{gate.naming.gate}.weight")  # int32 [H, I/8]
        shapes["moe"] = (words[0], words[1] * 8)
    if spec.get("linear"):
        words = shape(f"{spec['linear']}.weight")  # int32 [in, out/8]
        kind = "row" if spec["linear"].rsplit(".", 1)[-1] in ROW_PARALLEL else "column"
        shapes["linear"] = (kind, words[0], words[1] * 8)
    return shapes


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
