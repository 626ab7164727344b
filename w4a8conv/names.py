"""Names every layer shares: files, description keys and quant types, fixed counts. Imports nothing of ours.

Readers of a processed checkpoint (``runtime``, ``verify``, the vLLM plugin) and its writers use these,
so a name is spelled once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container

DESCRIPTION_FILE = "quant_model_description.json"
INDEX_SUFFIX = ".safetensors.index.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "w4a8conv.sha256"  # `sha256sum -c w4a8conv.sha256` checks it too
STATE_DIR = ".w4a8conv"  # an unfinished conversion's state, inside --out
JOB_FILE = "job.json"  # in STATE_DIR: the conversion's plan (ConversionPlan.to_bytes)

TOOL_SECTION = "w4a8conv"  # the description's section recording what w4a8conv did
# Of that section and the processed tensors. 2 (2026-11-30): the section names the target and the
# upstream processing it mirrors; the tensors are those of 1, which readers still accept.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
W4A8_TYPE = "W4A8_DYNAMIC"
# Our output's quant type: a stock vllm-ascend has no scheme for it and raises NotImplementedError,
# instead of re-processing already processed tensors.
PREPACKED_TYPE = "W4A8_DYNAMIC_PREPACKED"
PROCESSED_FORMAT = "processed"  # what inspect calls a w4a8conv output

SCALE_BIAS_CHUNKS = 16  # msModelSlim's input chunks of a row-parallel scale_bias
MAX_MOE_TP = 16  # vllm-ascend's MoE tensor-parallel limit, set by those chunks
# Row-parallel projections: tensor parallelism splits their input dim, so scale_bias keeps chunks
# (w2: an expert's or a shared expert's down projection where w1/w2/w3 name them).
ROW_PARALLEL = frozenset({"down_proj", "o_proj", "out_proj", "dense_4h_to_h", "wo", "w2"})
# The tensors of one W4A8 projection in a source checkpoint, by role (``<prefix>.<role>``).
SOURCE_ROLES = (
    "weight",
    "weight_scale",
    "weight_offset",
    "weight_scale_second",
    "weight_offset_second",
    "scale_bias",
    "weight_zero_point",  # compressed-tensors' name for an offset; symmetric checkpoints have none
)
# Roles that must hold zeros: W4A8_DYNAMIC kernels take symmetric int4 only.
ZERO_ROLES = ("weight_offset", "weight_offset_second", "weight_zero_point")


@functools.lru_cache(maxsize=1 << 20)  # the same names are sorted several times per plan
def natural_key(name: str) -> tuple:
    """Sort ``layers.10`` after ``layers.9``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def format_problem(section: object) -> str | None:
    """Why a reader of this release cannot trust a processed checkpoint's ``w4a8conv`` section, or None."""
    if not isinstance(section, dict):
        return f"no '{TOOL_SECTION}' section: not a w4a8conv output"
    version = section.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
        return f"format_version {version!r}, this w4a8conv reads {readable}: use the w4a8conv that wrote it"
    return None


def tensor_entries(description: dict, tensors: Container[str] = ()) -> dict[str, str]:
    """The per-tensor part of a description: keys with a dot, and keys naming one of ``tensors`` (the
    checkpoint's), as DeepSeek-V4's ``hc_head_fn``. Its top-level keys (``version``...) name no tensor."""
    return {k: v for k, v in description.items() if isinstance(v, str) and ("." in k or k in tensors)}


# The canary: one MoE expert's (and one W4A8 Linear's) source tensors, byte for byte, beside the
# shards. Not named by the index and not ending in .safetensors, so no loader takes it for weights;
# the plugin runs the installed engine's own processing on it and compares with the converted tensors.
CANARY_FILE = "w4a8conv.canary"
CANARY_SKIP_ENV = "W4A8CONV_SKIP_CANARY"
