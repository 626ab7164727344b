"""How checkpoints name routed experts: the one table sources, planning, verify and serving read.

A W4A8 projection is a routed expert when it sits under ``experts.<int>.``, whatever comes before it
(``mlp``, ``ffn``, ``block_sparse_moe``, ``language_model``, ``mtp``). Which of gate, up and down it is
comes from :data:`NAMINGS`: a model family that names them otherwise is one more row, and a family
whose layers sit elsewhere is one more row of :data:`FAMILIES` (for ``inspect``'s wording only).
Outputs keep the source's names, so a serving engine renames them as it renames the source's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

ROLES = ("gate", "up", "down")  # vLLM's FusedMoE: w13 = [gate ; up] (its shards w1 and w3), w2 = down


@dataclass(frozen=True)
class ExpertNaming:
    """The names one family of checkpoints gives an expert's three projections."""

    gate: str
    up: str
    down: str
    label: str  # as people write it
    families: str  # who writes it

    def name_of(self, role: str) -> str:
        return {"gate": self.gate, "up": self.up, "down": self.down}[role]


NAMINGS = (
    ExpertNaming("gate_proj", "up_proj", "down_proj", "gate_proj/up_proj/down_proj", "DeepSeek-V3/R1, GLM-5, Qwen"),
    # msModelSlim's DeepSeek-V4 adapter, MiniMax-M2/M3 and Kimi-K3: w1 = gate, w3 = up, w2 = down
    ExpertNaming("w1", "w3", "w2", "w1/w2/w3", "DeepSeek-V4, MiniMax-M2/M3, Kimi-K3"),
)
DEFAULT_NAMING = NAMINGS[0]
ROLE_OF = {naming.name_of(role): role for naming in NAMINGS for role in ROLES}
NAMING_OF = {naming.name_of(role): naming for naming in NAMINGS for role in ROLES}
_PROJECTIONS = "|".join(map(re.escape, ROLE_OF))
_EXPERT = re.compile(rf"^(?P<layer>(?:.+\.)?experts)\.(?P<expert>\d+)\.(?P<proj>{_PROJECTIONS})$")


@dataclass(frozen=True)
class ExpertName:
    """One routed expert projection's prefix, taken apart: ``<layer>.<expert>.<proj>``."""

    layer: str  # the experts' prefix, e.g. ``layers.3.ffn.experts``
    expert: int
    proj: str  # as the checkpoint names it: gate_proj, w1...

    @property
    def role(self) -> str:
        return ROLE_OF[self.proj]

    @property
    def naming(self) -> ExpertNaming:
        return NAMING_OF[self.proj]


@functools.lru_cache(maxsize=1 << 20)  # every plan, verify and canary asks for the same names
def parse_expert(prefix: str) -> ExpertName | None:
    """``prefix`` as a routed expert's projection, or None for anything else (a Linear, a shared expert)."""
    match = _EXPERT.match(prefix)
    if match is None:
        return None
    return ExpertName(match["layer"], int(match["expert"]), match["proj"])


def expert_prefix(layer: str, expert: int, proj: str) -> str:
    return f"{layer}.{expert}.{proj}"


@dataclass(frozen=True)
class Family:
    """Where a family's checkpoints put their MoE layers, for saying which naming a checkpoint uses."""

    label: str
    layers: re.Pattern  # matches the experts' prefix of its MoE layers (the MTP layer's included)
    naming: ExpertNaming


_W123 = NAMINGS[1]
FAMILIES = (
    Family("DeepSeek-V4", re.compile(r"^(layers|mtp)\.\d+\.ffn\.experts$"), _W123),
    Family("MiniMax-M2/M3 or Kimi-K3", re.compile(r"(^|\.)block_sparse_moe\.experts$"), _W123),
    Family("Qwen3.5-MoE", re.compile(r"^model\.language_model\.layers\.\d+\.mlp\.experts$"), DEFAULT_NAMING),
    Family(
        "DeepSeek-V3/R1, Kimi-K2, GLM-5 or Qwen3-MoE",
        re.compile(r"^model\.layers\.\d+\.mlp\.experts$"),
        DEFAULT_NAMING,
    ),
)

_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_mtp_layer(layer: str, decoder_layers: int | None) -> bool:
    """Whether an MoE layer is a multi-token-prediction layer: under ``mtp`` (DeepSeek-V4, Qwen3.5), or
    numbered past the decoder's ``num_hidden_layers`` (DeepSeek-V3/R1, GLM-5)."""
    if "mtp" in layer.split("."):
        return True
    number = _LAYER_NUMBER.search(layer + ".")
    return decoder_layers is not None and number is not None and int(number[1]) >= decoder_layers


def describe_naming(layers: Iterable[str], namings: Iterable[ExpertNaming], decoder_layers: int | None) -> str | None:
    """What ``inspect`` says of a checkpoint's experts, e.g. "w1/w2/w3, DeepSeek-V4 naming, MTP layer
    included"; None without MoE layers. ``layers``: the experts' prefixes; ``namings``: those found."""
    layers = list(layers)
    if not layers:
        return None
    labels = sorted({naming.label for naming in namings})
    families = sorted({f.label for layer in layers for f in FAMILIES if f.layers.search(layer)})
    words = [" and ".join(labels)]
    words.append(f"{families[0]} naming" if len(families) == 1 else "naming of no known family")
    mtp = sum(is_mtp_layer(layer, decoder_layers) for layer in layers)
    if mtp:
        words.append("MTP layer included" if mtp == 1 else f"{mtp} MTP layers included")
    return ", ".join(words)
