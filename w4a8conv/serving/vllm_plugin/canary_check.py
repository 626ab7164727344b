"""Prove, on the installed engine, that the converted tensors are what it would compute.

Once per process and method kind (MoE, Linear), before the first prepacked layer is used, the plugin
runs the installed vllm-ascend's own W4A8_DYNAMIC method on the canary (the source tensors of one
expert and one Linear, kept beside the shards: :mod:`w4a8conv.formats.canary`) exactly as it would for the
unconverted checkpoint: its ``create_weights`` parameters, a load through the serving layer's own
weight loader (this rank's tensor-parallel slice, or the whole expert under expert parallelism), its
``process_weights_after_loading`` in this process's serving mode (dynamic EPLB lists, MegaMoE...).
The plugin's own path does the same with that expert's converted tensors, and every tensor the two
leave on their layers is compared bit for bit, on the device. A difference, or an engine that
refuses the canary, is a refusal naming the tensor; agreement serves, whatever the version string.

A bias the engine computes from the weights (mindie sources) is summed in fp32 in an order only the
device knows; it is compared within the summation error bound instead of bit for bit.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...experts import ROLE_OF
from ...names import CANARY_FILE, CANARY_SKIP_ENV, INDEX_SUFFIX, ROW_PARALLEL
from .log import log

# Left on the layer by the engine but read by no W4A8 kernel: symmetric quantization's zero offsets.
UNREAD = ("_offset", "_offset_second")
# vLLM's FusedMoE parameter and shard id of each expert role, whatever the checkpoint calls it
_MOE_SHARDS = {"gate": ("w13", "w1"), "up": ("w13", "w3"), "down": ("w2", "w2")}
_FP32_UNIT = 2.0**-24


class CanaryRefusal(ValueError):
    """The installed engine computes something else than the checkpoint holds, or refuses the canary."""


_verdicts: dict[str, CanaryRefusal | None] = {}  # per method kind, for this process


def skipped() -> bool:
    return os.environ.get(CANARY_SKIP_ENV, "") not in ("", "0")


@functools.cache
def warn_skipped() -> None:
    log.warning(
        "w4a8conv: %s is set: the canary check is skipped and the installed vllm-ascend is trusted by its "
        "version string alone; wrong numbers will not be caught",
        CANARY_SKIP_ENV,
    )


def model_directory(vllm_config: Any) -> Path | None:
    """The served checkpoint's directory: the model path, or its Hugging Face snapshot (canary fetched)."""
    model_config = getattr(vllm_config, "model_config", None)
    model = getattr(model_config, "model", None)
    if model is None:
        return None
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import hf_hub_download

        revision = getattr(model_config, "revision", None)
        return Path(hf_hub_download(model, CANARY_FILE, revision=revision)).parent
    except Exception:
        return None


def build_engine_scheme(vllm_config: Any, engine_description: dict, build: Callable[[], Any]) -> Any:
    """The engine's own method as it would be built for the unconverted checkpoint: ``build`` runs while
    the config's quant description is the one the engine reads for it. Returns the method, or the
    exception the engine raised (a refusal of the canary, said when it is checked)."""
    quant_config = vllm_config.quant_config
    processed = quant_config.quant_description
    quant_config.quant_description = {**engine_description}
    # From 0.30 the method asks the config's name, not the description, whether it serves compressed-tensors:
    # the server's config for the unconverted checkpoint would have been compressed-tensors' own.
    method = engine_description.get("ascend_quant_method")
    if method is not None:
        quant_config.get_name = lambda: method
    try:
        return build()
    except Exception as e:
        return e
    finally:
        quant_config.quant_description = processed
        vars(quant_config).pop("get_name", None)


class LazyTensors:
    """Tensors by name, read from their files one at a time when asked: the check holds one source
    tensor at a time, not a whole expert."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def get(self, name: str) -> torch.Tensor | None:
        return self[name] if name in self.files else None

    def shape(self, name: str) -> list[int]:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_slice(name).get_shape()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.files:
            yield name, self[name]


class Canary:
    """What a check needs, captured where vLLM's config is current (a method's ``__init__``)."""

    def __init__(self, section: dict, vllm_config: Any, version: str | None, target_hint: str):
        self.section, self.version, self.target_hint = section, version, target_hint
        self.spec = section.get("canary")
        self.root = model_directory(vllm_config) if self.spec else None

    def tensors(self, names: list[str]) -> LazyTensors:
        """The canary's tensors, after checking the file's sha256 against the artifact contract."""
        path = (self.root or Path(".")) / self.spec["file"]
        if self.root is None or not path.is_file():
            raise CanaryRefusal(
                f"w4a8conv: the canary {self.spec['file']} is not beside the checkpoint ({self.root}); copy the whole "
                f"converted directory, or set {CANARY_SKIP_ENV}=1 to serve unchecked"
            )
        from ...safetensors_io import sha256_file

        digest = sha256_file(path)
        if digest != self.spec.get("sha256"):
            raise CanaryRefusal(
                f"w4a8conv: {path}: sha256 {digest[:16]}... is not the {str(self.spec.get('sha256'))[:16]}... the "
                "checkpoint records: the canary was changed; restore it from the conversion or convert again"
            )
        return LazyTensors({name: path for name in names})

    def converted(self, names: list[str]) -> LazyTensors:
        """The checkpoint's converted tensors by name, from the shards its index names."""
        index = next(self.root.glob(f"*{INDEX_SUFFIX}"))
        weight_map = json.loads(index.read_text())["weight_map"]
        return LazyTensors({name: self.root / weight_map[name] for name in names})

    def layout_refusal(self, what: str, error: Exception) -> CanaryRefusal:
        """The engine's own processing failed on the unconverted canary at this parallel layout: stock would
        not serve the checkpoint there either, whatever it was converted for."""
        return CanaryRefusal(
            f"w4a8conv: vllm-ascend {self.version} cannot load or process the canary {what} itself at this parallel "
            f"layout ({type(error).__name__}: {error}), so stock would not serve the unconverted checkpoint here "
            "either; choose another layout (`w4a8conv check-engine OUT` lists those that serve)"
        )

    def refusal(self, what: str) -> CanaryRefusal:
        return CanaryRefusal(
            f"w4a8conv: vllm-ascend {self.version} {what}; this checkpoint was converted for --target "
            f"{self.section.get('target')} (vllm-ascend {self.section.get('engine_releases')}): {self.target_hint}"
        )


_prepared: dict[str, tuple[Canary | None, Any]] = {}


def prepare(kind: str, version: str | None, build: Callable[[], Any]) -> tuple[Canary | None, Any]:
    """The canary and the engine's own method for it, once per process and method kind, from a method's
    ``__init__`` (where vLLM's config is current). Without a canary (skipped, or a checkpoint converted
    before it existed) the release is checked by its version string, as before; returns (None, None)."""
    if kind in _prepared:
        return _prepared[kind]
    from vllm.config import get_current_vllm_config

    from .checks import check_engine_release, checkpoint_section

    section = checkpoint_section()
    if skipped() or not isinstance(section.get("canary"), dict):
        if skipped():
            warn_skipped()
        check_engine_release(version)
        _prepared[kind] = (None, None)
    else:
        config = get_current_vllm_config()
        canary = Canary(section, config, version, _target_hint(section, version))
        _prepared[kind] = (canary, build_engine_scheme(config, canary.spec["engine_description"], build))
    return _prepared[kind]


def forget() -> None:
    """Forget this process's canaries and verdicts (a test serving several checkpoints in one process)."""
    _prepared.clear()
    _verdicts.clear()
    warn_skipped.cache_clear()


def _target_hint(section: dict, version: str | None) -> str:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    from ...formats.targets import TARGETS

    try:
        installed = Version(version or "")
    except InvalidVersion:
        installed = None
    matching = [
        name
        for name, target in TARGETS.items()
        if installed is not None and installed in SpecifierSet(target.engine_releases, prereleases=True)
    ]
    if matching and matching[-1] != section.get("target"):
        return f"convert it again with --target {matching[-1]}"
    return (
        "no w4a8conv target reproduces this release's W4A8 processing; serve the unconverted checkpoint, "
        "or convert for a release that does"
    )


def run_once(kind: str, canary: Canary, check: Callable[[], str] | None) -> None:
    """Run ``check`` once per process and method kind (None: not on this layer, a later one); a refusal is
    raised again for every later layer. Agreement is logged, with a warning where the release string
    alone would not have vouched for the checkpoint."""
    if kind in _verdicts:
        if _verdicts[kind] is not None:
            raise _verdicts[kind]
        return
    if check is None:
        return
    started = time.monotonic()
    try:
        what = check()
    except CanaryRefusal as refusal:
        _verdicts[kind] = refusal
        raise
    _verdicts[kind] = None
    seconds = time.monotonic() - started
    note = version_note(canary.section, canary.version)
    if note is None:
        log.info("w4a8conv: the canary %s matched vllm-ascend %s bit for bit (%.2f s)", what, canary.version, seconds)
    else:
        log.warning(
            "w4a8conv: %s; served because its own processing of the canary %s matched the checkpoint bit for "
            "bit (%.2f s)",
            note,
            what,
            seconds,
        )


def _canary_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """An empty layer of the serving layer's class, with its plain attributes (tp rank, flags...), so
    that the engine's code sees the same kind of layer; its parameters come from ``create_weights``."""
    canary = type(layer).__new__(type(layer))
    torch.nn.Module.__init__(canary)
    for key, value in vars(layer).items():
        if not key.startswith("_") and isinstance(value, str | int | float | bool | type(None)):
            object.__setattr__(canary, key, value)
    object.__setattr__(canary, _CANARY_MARK, True)
    return canary


_CANARY_MARK = "_w4a8conv_canary"


def is_canary_layer(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is one the canary check made (not one the server serves)."""
    return bool(layer.__dict__.get(_CANARY_MARK, False))


def _mark_unloaded(layer: torch.nn.Module) -> None:
    """Fill new parameters with all-ones bits (NaN in floats), so that what no loader wrote is seen, and
    is the same on every run (``torch.empty`` is whatever memory held)."""
    for param in layer.parameters(recurse=False):
        param.data.view(torch.uint8).fill_(0xFF) if param.is_contiguous() else param.data.fill_(float("nan"))


def _refuse_unloaded(canary: Canary, layer: torch.nn.Module, what: str) -> None:
    """An engine parameter the load left (partly) unwritten: the engine would serve whatever memory held."""
    for name, param in layer.named_parameters(recurse=False):
        if param.is_floating_point() and not name.endswith(UNREAD) and bool(torch.isnan(param.data).any()):
            raise canary.refusal(
                f"leaves {name} of the canary {what} unloaded at this parallel layout (its weight loader gives this "
                "rank none of it), so it cannot serve these weights here; use expert parallelism "
                "(--enable-expert-parallel) or MoE tensor-parallel size 1"
            )


def _with_scheme(adapter: Any, scheme: Any) -> Any:
    """The serving layer's method adapter, wrapping the engine's own method instead of the plugin's."""
    twin = copy.copy(adapter)
    twin.quant_method = scheme
    return twin


def _device(layer: torch.nn.Module) -> torch.device:
    return next(iter(layer.parameters())).device


def held_tensors(layer: torch.nn.Module, unread: tuple[str, ...] = ()) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """What the processing left on a layer for the kernels: parameters, buffers, tensors and tensor lists,
    less the zero offsets and the names in ``unread`` (kept by the engine, read by no kernel)."""
    held: dict[str, Any] = {name: p.data for name, p in layer.named_parameters(recurse=False)}
    held.update(dict(layer.named_buffers(recurse=False)))
    for name, value in vars(layer).items():
        if name.startswith("_"):
            continue
        if isinstance(value, torch.Tensor) or (
            isinstance(value, list | tuple) and value and all(isinstance(v, torch.Tensor) for v in value)
        ):
            held[name] = value
    return {k: v for k, v in held.items() if not k.endswith(UNREAD) and k not in unread}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return f"a list of {len(value)} tensors"


def first_difference(
    engine: dict[str, Any], ours: dict[str, Any], tolerance: dict[str, float]
) -> tuple[str, str, str] | None:
    """The first tensor that differs: (name, what the engine computes, what the checkpoint gives), or None.

    ``tolerance``: names compared within an absolute bound instead of bit for bit.
    """
    for name in sorted(set(engine) | set(ours)):
        if name not in ours or name not in engine:
            return (
                name,
                _describe(engine[name]) if name in engine else "nothing",
                (_describe(ours[name]) if name in ours else "nothing"),
            )
        a, b = engine[name], ours[name]
        listed = isinstance(a, list | tuple)
        if listed != isinstance(b, list | tuple) or (listed and len(a) != len(b)):
            return name, _describe(a), _describe(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True) if listed else [(a, b)]):
            where = f"{name}[{i}]" if listed else name
            if x.dtype != y.dtype or x.shape != y.shape:
                return where, _describe(x), _describe(y)
            if storage_format(x) != storage_format(y):
                return where, f"storage format {storage_format(x)}", f"storage format {storage_format(y)}"
            y = y.to(x.device)
            if name in tolerance and x.is_floating_point():
                worst = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
                if not worst <= tolerance[name]:
                    return where, f"values {worst:.3g} away", f"within {tolerance[name]:.3g} (fp32 summation)"
                continue
            bits_x, bits_y = (t.contiguous().reshape(-1).view(torch.uint8) for t in (x, y))
            if not torch.equal(bits_x, bits_y):
                at = int((bits_x != bits_y).nonzero()[0]) // x.element_size()
                flat_x, flat_y = x.reshape(-1), y.reshape(-1)
                return where, f"{_describe(x)} with element {at} = {flat_x[at].item()!r}", f"{flat_y[at].item()!r}"
    return None


def bias_bound(tensors: LazyTensors, prefix: str, rows: int = 256) -> float:
    """An upper bound on an fp32 ``8 * sum_k w * s2 * s`` computed in any order: (n + 2) roundings of the
    sum of the terms' magnitudes (each product rounds once, each partial sum once). In row blocks."""
    weight, scale = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"].double().abs().reshape(-1)
    second = tensors.get(f"{prefix}.weight_scale_second")
    worst = 0.0
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].to(torch.int32).abs()
        if second is None:
            sums = w.sum(1).double()
        else:
            s2 = second[start : start + rows].double().abs()
            sums = (w.reshape(w.shape[0], s2.shape[1], -1).sum(-1).double() * s2).sum(1)
        block = 8 * sums * scale[start : start + rows]
        worst = max(worst, float(block.max()) if block.numel() else 0.0)
    return (weight.shape[1] + 2) * _FP32_UNIT * worst


def check_moe(
    canary: Canary,
    engine_scheme: Any,
    layer: torch.nn.Module,
    shape: tuple[int, int, torch.dtype],
    process: Callable[[torch.nn.Module], None],
) -> str:
    """Compare the engine's and the plugin's processing of the canary expert on this rank (see module)."""
    spec = canary.spec
    prefix = f"{spec['moe_layer']}.{spec['expert']}"
    if isinstance(engine_scheme, Exception):
        raise canary.refusal(f"refuses the canary expert {prefix}: {engine_scheme}")
    names = [n for n in spec["tensors"] if n.startswith(prefix + ".")]
    source = canary.tensors(names)
    roles = ("weight", "weight_scale", "scale_bias")
    projections = sorted({name[len(prefix) + 1 :].split(".", 1)[0] for name in names})  # as the checkpoint names them
    converted = canary.converted([f"{prefix}.{p}.{r}" for p in projections for r in roles])
    intermediate, hidden, dtype = shape
    expert = local_expert_zero(layer)
    adapter = type(layer.quant_method)

    def load(scheme: Any, tensors: LazyTensors, own: bool) -> torch.nn.Module:
        target = _canary_layer(layer)
        with torch.device(_device(layer)):
            creator = layer.quant_method if own else _with_scheme(layer.quant_method, scheme)
            adapter.create_weights(creator, target, 1, hidden, intermediate, dtype, weight_loader=layer.weight_loader)
        _mark_unloaded(target)
        for name, tensor in tensors.items():
            proj, role = name[len(prefix) + 1 :].split(".", 1)
            param_name, shard = _MOE_SHARDS[ROLE_OF[proj]]
            param = getattr(target, f"{param_name}_{role}", None)
            if param is not None:
                param.weight_loader(param, tensor, f"{param_name}_{role}", shard_id=shard, expert_id=expert)
        return target

    def bound() -> float:
        return max(bias_bound(source, f"{prefix}.{p}") for p in projections)

    return _run_both(canary, f"MoE expert {prefix}", load, engine_scheme, source, converted, process, bound)


def linear_canary_matches(canary: Canary, layer: torch.nn.Module) -> bool:
    """Whether ``layer`` loads like the canary's Linear: row-parallel or not, and not a merged layer
    (whose loader wants a shard id the canary's own layer does not have)."""
    linear = canary.spec.get("linear") if canary.spec else None
    if linear is None:
        return False
    row = linear.rsplit(".", 1)[-1] in ROW_PARALLEL
    merged = any(word in type(layer).__name__ for word in ("Merged", "QKV"))
    return not merged and hasattr(layer, "input_is_parallel") == row


def check_linear(
    canary: Canary,
    engine_scheme: Any,
    layer: torch.nn.Module,
    dtype: torch.dtype,
    process: Callable[[torch.nn.Module], None],
) -> str:
    """As :func:`check_moe`, for the canary's W4A8 Linear, loaded through ``layer``'s loader."""
    prefix = canary.spec["linear"]
    if isinstance(engine_scheme, Exception):
        raise canary.refusal(f"refuses the canary Linear {prefix}: {engine_scheme}")
    source = canary.tensors([n for n in canary.spec["tensors"] if n.startswith(prefix + ".")])
    roles = ("weight", "weight_scale_second", "scale_bias")
    converted = canary.converted([f"{prefix}.{r}" for r in roles])
    out_features = source.shape(f"{prefix}.weight_scale")[0]
    in_features = source.shape(f"{prefix}.weight")[1]
    tp = max(int(getattr(layer, "tp_size", 1) or 1), 1)
    row = hasattr(layer, "input_is_parallel")
    in_part, out_part = (in_features // tp, out_features) if row else (in_features, out_features // tp)
    adapter = type(layer.quant_method)

    def load(scheme: Any, tensors: LazyTensors, own: bool) -> torch.nn.Module:
        target = _canary_layer(layer)
        with torch.device(_device(layer)):
            creator = layer.quant_method if own else _with_scheme(layer.quant_method, scheme)
            sizes = (in_part, [out_part], in_features, out_features, dtype)
            adapter.create_weights(creator, target, *sizes, weight_loader=layer.weight_loader)
        _mark_unloaded(target)
        for name, tensor in tensors.items():
            param = getattr(target, name[len(prefix) + 1 :], None)
            if param is not None:
                param.weight_loader(param, tensor)
        return target

    return _run_both(
        canary, f"Linear {prefix}", load, engine_scheme, source, converted, process, lambda: bias_bound(source, prefix)
    )


def _run_both(
    canary: Canary,
    what: str,
    load: Callable[[Any, LazyTensors, bool], torch.nn.Module],
    engine_scheme: Any,
    source: LazyTensors,
    converted: LazyTensors,
    process: Callable[[torch.nn.Module], None],
    bias_tolerance: Callable[[], float],
) -> str:
    """The engine's processing of the source, the plugin's of the converted tensors, then the comparison.
    ``bias_tolerance`` applies to the biases the engine computes from the weights (mindie sources)."""
    try:
        engine_layer = load(engine_scheme, source, False)
        _refuse_unloaded(canary, engine_layer, what)
        engine_scheme.process_weights_after_loading(engine_layer)
    except CanaryRefusal:
        raise
    except Exception as e:  # the engine's own refusal, whatever its type
        raise canary.layout_refusal(what, e) from e
    ours = load(None, converted, True)
    process(ours)
    # A Linear's weight_scale is folded into weight_scale_second, which its matmul reads instead.
    unread = ("weight_scale",) if what.startswith("Linear") else ()
    engine, mine = held_tensors(engine_layer, unread), held_tensors(ours, unread)
    computed = canary.section.get("source_layout") == "mindie"
    tolerance = {name: bias_tolerance() for name in engine if "bias" in name} if computed else {}
    found = first_difference(engine, mine, tolerance)
    if found is not None:
        name, theirs, ours_found = found
        raise canary.refusal(f"computes {name} of the canary {what} as {theirs}, the checkpoint gives {ours_found}")
    return what


def storage_format(tensor: torch.Tensor) -> int | None:
    """The device storage format (2 ND, 29 FRACTAL_NZ...) torch_npu reports for a tensor, or None where
    there is none to report (no NPU): a layout the kernels depend on, which no comparison of values sees."""
    torch_npu = sys.modules.get("torch_npu")
    get_format = getattr(torch_npu, "get_npu_format", None) if torch_npu is not None else None
    if get_format is None:
        return None
    try:
        return int(get_format(tensor))
    except Exception:  # a CPU tensor, or a torch_npu without the call: no format to compare
        return None


def local_expert_zero(layer: torch.nn.Module) -> int:
    """The global id of this rank's first local expert: the canary is loaded into that slot."""
    expert_map = getattr(layer, "expert_map", None)
    if expert_map is None:
        return 0
    if isinstance(expert_map, dict):
        return next(g for g, local in expert_map.items() if local == 0)
    return int((expert_map == 0).nonzero()[0])


def version_note(section: dict, version: str | None) -> str | None:
    """Why the installed release alone would not vouch for the checkpoint, or None when it is in range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    releases = section.get("engine_releases")
    if releases is None:
        return None
    try:
        installed = Version(version) if version else None
    except InvalidVersion:
        installed = None
    if installed is None or installed.is_devrelease or installed.local:
        return f"vllm-ascend {version} is a development build or unversioned"
    if installed not in SpecifierSet(releases, prereleases=True):
        return f"vllm-ascend {version} is outside the releases {releases} the checkpoint was converted for"
    return None
