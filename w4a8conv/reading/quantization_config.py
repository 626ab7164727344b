"""LLM-Compressor (compressed-tensors) checkpoints: their ``quantization_config`` read as a description.

Such a checkpoint has no ``quant_model_description.json``; ``config.json`` says which modules each
scheme quantizes (``config_groups``: targets, weight and activation arguments) and which it leaves
alone (``ignore``). This module turns that into the per-tensor types an msModelSlim description
holds, so that the rest of w4a8conv plans it like any other source, and gives the ``config.json`` the
output is served with. Pure dict logic: no I/O, no torch.

The output is an msModelSlim-style processed checkpoint served with ``--quantization ascend``: vLLM
picks the method from ``quantization_config.quant_method`` and refuses a different ``--quantization``,
so the served ``config.json`` has no ``quantization_config`` (the description's section keeps it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..errors import BadInputError
from ..names import W4A8_TYPE

QUANT_METHOD = "compressed-tensors"
W8A8_DYNAMIC_TYPE = "W8A8_DYNAMIC"
# One int4 or int8 value per int8 byte; "pack-quantized" (int32 words, weight-only) is another layout.
SUPPORTED_FORMATS = ("int-quantized",)


def is_compressed_tensors(config: dict | None) -> bool:
    """Whether a ``config.json`` describes a compressed-tensors checkpoint."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def served_config(config: dict) -> dict:
    """The ``config.json`` of the processed output: the same, without ``quantization_config``."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def _scheme(name: str, group: dict, default_format: str | None, where: str) -> str:
    """The quant type a config group stands for, or refuse it naming the group."""
    weights = group.get("weights") or {}
    inputs = group.get("input_activations") or {}
    if not isinstance(weights, dict) or not isinstance(inputs, dict):
        raise BadInputError(f"{where}: config_groups.{name}: weights and input_activations must be objects")
    fmt = group.get("format") or default_format
    if fmt not in SUPPORTED_FORMATS:
        raise BadInputError(f"{where}: config_groups.{name}: format {fmt!r}; w4a8conv reads int-quantized only")

    symmetric = weights.get("symmetric") is not False and inputs.get("symmetric") is not False
    integer = weights.get("type") in (None, "int") and inputs.get("type") in (None, "int")
    static_weights = not weights.get("dynamic")
    token_inputs = inputs.get("strategy") == "token" and inputs.get("dynamic") is True
    channel = weights.get("strategy") == "channel"
    if integer and symmetric and static_weights and token_inputs and inputs.get("num_bits") == 8 and channel:
        if weights.get("num_bits") == 4:
            return W4A8_TYPE
        if weights.get("num_bits") == 8:
            return W8A8_DYNAMIC_TYPE
    summary = (
        f"weights {weights.get('num_bits')}-bit {weights.get('type')} {weights.get('strategy')}"
        f"{'' if weights.get('symmetric') is not False else ' asymmetric'}, "
        f"activations {inputs.get('num_bits')}-bit {inputs.get('strategy')}"
        f"{' dynamic' if inputs.get('dynamic') else ' static'}"
    )
    raise BadInputError(
        f"{where}: config_groups.{name}: {summary} is not a scheme w4a8conv converts "
        "(W4A8 or W8A8: symmetric int, per-channel weights, dynamic per-token int8 activations)"
    )


def _matches(module: str, target: str, quantized: bool) -> bool:
    """compressed-tensors' target rule: ``re:`` a regex matched at the start of the module name, else
    the exact name, else a module class (``Linear``), which the tensors cannot show: any quantized module."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if target == module:
        return True
    return quantized and "." not in target and target[:1].isupper()


def description_from_config(config: dict, tensor_names: Iterable[str], where: str) -> dict[str, Any]:
    """The msModelSlim description equivalent to a compressed-tensors ``config.json``.

    Every module a W4A8 group targets gets ``W4A8_DYNAMIC`` for its ``weight`` and ``weight_scale``,
    a W8A8 group ``W8A8_DYNAMIC``; every other tensor ``FLOAT``. ``where`` names the config file.

    Raises:
        BadInputError: a scheme, format or tensor this conversion cannot represent, naming it.
    """
    quantization = config["quantization_config"]
    sparsity = quantization.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
        raise BadInputError(f"{where}: sparsity_config format {sparsity.get('format')!r}; w4a8conv reads dense weights")
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise BadInputError(f"{where}: quantization_config has no config_groups")
    ignore = quantization.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise BadInputError(f"{where}: quantization_config.ignore is not a list of names")
    schemes = []
    for name, group in groups.items():
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise BadInputError(f"{where}: config_groups.{name}: targets is not a list of names")
        schemes.append((targets, _scheme(name, group, quantization.get("format"), where)))
    for target in [t for targets, _ in schemes for t in targets] + ignore:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as e:
                raise BadInputError(f"{where}: {target!r} is not a regular expression ({e})") from None

    names = sorted(tensor_names)
    present = set(names)
    types = dict.fromkeys(names, "FLOAT")
    has_w4a8 = False
    for weight in (n for n in names if n.endswith(".weight")):
        module = weight[: -len(".weight")]
        quantized = f"{module}.weight_scale" in present
        if any(_matches(module, target, quantized) for target in ignore):
            continue
        quant_type = next((t for targets, t in schemes if any(_matches(module, x, quantized) for x in targets)), None)
        if quant_type is None:
            continue
        if not quantized:
            raise BadInputError(f"{where}: {module} is quantized by config_groups but has no {module}.weight_scale")
        for role in ("weight", "weight_scale", "weight_zero_point"):
            if f"{module}.{role}" in present:
                types[f"{module}.{role}"] = quant_type
        has_w4a8 = has_w4a8 or quant_type == W4A8_TYPE
    return {"model_quant_type": W4A8_TYPE if has_w4a8 else W8A8_DYNAMIC_TYPE, "group_size": 0, **types}
