"""What the plugin checks before it serves a checkpoint: the artifact contract against the engine.

Each refusal is one ``ValueError`` line naming what was expected and what was found, at model load,
rather than wrong numbers later.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ...names import DESCRIPTION_FILE, PREPACKED_TYPE, SCALE_BIAS_CHUNKS, TOOL_SECTION, format_problem
from .log import log


def checkpoint_section() -> dict[str, Any]:
    """The ``w4a8conv`` section of the checkpoint vLLM is loading (read as upstream reads the description)."""
    from vllm.config import get_current_vllm_config

    description = get_current_vllm_config().quant_config.quant_description
    section = description.get(TOOL_SECTION) if isinstance(description, dict) else None
    if not isinstance(section, dict):
        raise ValueError(
            f"w4a8conv: tensors are typed {PREPACKED_TYPE} but {DESCRIPTION_FILE} has no '{TOOL_SECTION}' section; "
            "convert the checkpoint again"
        )
    problem = format_problem(section)
    if problem is not None:
        raise ValueError(f"w4a8conv: {DESCRIPTION_FILE}: {problem}")
    return section


def check_engine_release(version: str | None) -> None:
    """Refuse a vllm-ascend release outside the range the checkpoint's processing mirrors.

    A development build (a git checkout of main or of a release branch) reports a version counted
    from the last tag on its history (0.19.1rc2.devN for main late in 2026), which says nothing about
    the code: it is let through with a warning, and what the code exposes decides.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    section = checkpoint_section()
    releases = section.get("engine_releases")
    if releases is None:  # format 1 recorded none
        return
    try:
        installed = Version(version) if version else None
    except InvalidVersion:
        installed = None
    if installed is None or installed.is_devrelease or installed.local:
        _warn_unchecked_release(version, releases)
        return
    if installed not in SpecifierSet(releases, prereleases=True):
        raise ValueError(
            f"w4a8conv: this checkpoint was converted for {section.get('target')} (vllm-ascend {releases}), "
            f"found vllm-ascend {version}; convert it again with a --target for this release"
        )


@functools.cache
def _warn_unchecked_release(version: str | None, releases: str) -> None:
    log.warning(
        "w4a8conv: vllm-ascend %s is a development build or unversioned; the checkpoint's releases %s not checked",
        version,
        releases,
    )


def check_serving_dtype(params_dtype: torch.dtype) -> None:
    """Refuse to serve in another dtype than the one the checkpoint's scales were rounded to."""
    recorded = checkpoint_section().get("params_dtype")
    found = str(params_dtype).removeprefix("torch.")
    if found != recorded:
        raise ValueError(
            f"w4a8conv: this checkpoint was converted for dtype {recorded} (its W4A8 scales are rounded to it), "
            f"but the server runs {found}; serve it with --dtype {recorded}, or convert it again"
        )


def check_moe_tensor_parallel(tp_size: int, what: str = "MoE tensor-parallel size") -> None:
    """Refuse a (MoE) tensor-parallel size that does not split the stored scale_bias chunks evenly."""
    if tp_size < 1 or SCALE_BIAS_CHUNKS % tp_size:
        sizes = ", ".join(str(n) for n in range(1, SCALE_BIAS_CHUNKS + 1) if SCALE_BIAS_CHUNKS % n == 0)
        raise ValueError(
            f"w4a8conv: {what} must divide the checkpoint's {SCALE_BIAS_CHUNKS} scale_bias chunks "
            f"({sizes}), found {tp_size}; use one of those or --enable-expert-parallel"
        )


def check_words_per_rank(intermediate_per_rank: int, tp_size: int) -> None:
    """Refuse a MoE tensor-parallel size that splits a gate or up projection's int32 words: the converted
    words hold 8 outputs each, so a rank's share of moe_intermediate must be a multiple of 8 (stock packs
    after slicing and has no such limit; real models' shares are 64 or more)."""
    if intermediate_per_rank % 8 == 0:
        return
    intermediate = intermediate_per_rank * tp_size
    working = [n for n in range(1, SCALE_BIAS_CHUNKS + 1) if SCALE_BIAS_CHUNKS % n == 0 and intermediate % (8 * n) == 0]
    raise ValueError(
        f"w4a8conv: MoE tensor-parallel size {tp_size} gives each rank {intermediate_per_rank} of moe_intermediate "
        f"{intermediate}, not a whole number of the converted int32 words (8 int4 each); use MoE tensor-parallel "
        f"size {', '.join(map(str, working)) or '1'} or --enable-expert-parallel"
    )


def check_groups_per_rank(group_size: int, intermediate_per_rank: int, tp_size: int) -> None:
    """Refuse per-group weights at a MoE tensor-parallel size whose input slice of down_proj is not a whole
    number of groups (stock vllm-ascend fails there with a reshape error; DeepSeek-R1 at tp 16 is one)."""
    if group_size <= 0 or intermediate_per_rank % group_size == 0:
        return
    intermediate = intermediate_per_rank * tp_size
    working = [
        n
        for n in range(1, SCALE_BIAS_CHUNKS + 1)
        if SCALE_BIAS_CHUNKS % n == 0 and intermediate % n == 0 and (intermediate // n) % group_size == 0
    ]
    raise ValueError(
        f"w4a8conv: per-group W4A8 with group_size {group_size} at MoE tensor-parallel size {tp_size} gives each "
        f"rank {intermediate_per_rank} of moe_intermediate {intermediate} for down_proj, not a whole number of groups; "
        f"use MoE tensor-parallel size {', '.join(map(str, working)) or '1'} or --enable-expert-parallel"
    )


def check_mix_placement(on: bool) -> None:
    """Refuse ``mix_placement``: the model then loads its shared experts (W8A8_DYNAMIC in every msModelSlim
    W4A8 recipe) into the W4A8 routed experts' parameters, as experts numbered after them. Stock
    vllm-ascend 0.23 fails there too: vLLM's loader cannot copy an int8 ``[I, H]`` weight into a W4A8
    expert's ``[I, H/2]`` (found on the real 0.23 code, tests/engine/test_families_engine.py)."""
    if on:
        raise ValueError(
            "w4a8conv: mix_placement is on, which loads the W8A8_DYNAMIC shared experts into the W4A8 routed "
            "experts' parameters (stock vllm-ascend cannot load that either); serve without mix_placement"
        )


def scale_bias_loading_problem(param: torch.nn.Parameter, tp_size: int, tp_rank: int, expert: int) -> str | None:
    """What is wrong with how ``param``'s own loader gives this rank its chunks of a ``w2_scale_bias``
    (``[H, 16]``, 16 input chunks), or None: it loads a marked tensor into the still empty parameter for
    ``expert`` (the rank's first local expert) and compares."""
    hidden = param.shape[1]
    probe = torch.arange(hidden * SCALE_BIAS_CHUNKS, dtype=torch.float32).reshape(hidden, SCALE_BIAS_CHUNKS)
    share = SCALE_BIAS_CHUNKS // tp_size
    expected = probe[:, tp_rank * share : (tp_rank + 1) * share]
    try:
        with torch.no_grad():
            param.weight_loader(param, probe.to(param.device), "experts.w2_scale_bias", shard_id="w2", expert_id=expert)
        loaded = param.data[0].cpu()
    except Exception as e:  # the loader's own failure is the finding
        return f"{type(e).__name__}: {e}"
    return None if torch.equal(loaded, expected) else f"rank {tp_rank} gets {list(loaded.shape)} other values"


def refuse_scale_bias_loading(problem: str, tp_size: int, tp_rank: int) -> None:
    raise ValueError(
        f"w4a8conv: this vLLM's MoE weight loader does not give MoE tensor-parallel rank {tp_rank} of {tp_size} its "
        f"{SCALE_BIAS_CHUNKS // tp_size} of the 16 w2_scale_bias chunks ({problem}); serve with "
        "--enable-expert-parallel or MoE tensor-parallel size 1"
    )
