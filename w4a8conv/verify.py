"""``w4a8conv verify``: prove an output is a correct conversion of its source, without trusting the converter.

Everything here is re-derived from the source with numpy, from W4A8_FORMATS.md, and shares no code
with ``packing``, ``scales``, ``processing`` or ``plan``: the operator words are rebuilt from the
source's int4 values by shifts (the converter transposes bytes and reinterprets them), scales
re-encoded and compared bit for bit, mindie biases recomputed in float64.
Only the file readers are shared. Checks: checksum manifest (unless converted without one); index
against the shard headers and sizes; description against the index and the source (every type,
and the keys a loader reads: group size, layout, version); the files copied beside the shards
(config, tokenizer...) and every pass-through tensor byte for byte; every (or a sampled fraction
of) W4A8 module value for value.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import DESCRIPTION_FILE, INDEX_SUFFIX, open_checkpoint
from .errors import BadInputError
from .jobs import MANIFEST_FILE, STATE_DIR, has_manifest, sha256_file
from .layouts import PREPACKED_TYPE
from .output import Progress
from .plan import TOOL_SECTION
from .safetensors_io import ShardHeader, TensorInfo, read_array, read_header

_MOE = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")
_ROLES = ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias")
_NUMPY = {"I8": np.int8, "I32": np.int32, "I64": np.int64, "F32": np.float32, "F16": np.float16, "F64": np.float64}
_MAX_PROBLEMS = 50
# Threads checking files, tensors and modules at once (numpy and hashlib release the GIL); each
# holds one module's arrays, about 100 MB for a DeepSeek-R1 expert.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
_COMPARE_CHUNK = 16 << 20  # bytes of a pass-through tensor compared at a time
_MATMUL_ROWS = 256  # weight rows the float reference dequantizes at once (a few MB)
_BIAS_ROWS = 64  # rows of float64 bias terms computed at once: a few MB, which stay in the cache


@dataclass
class VerifyReport:
    ok: bool = True
    modules_checked: int = 0
    numeric_checks: int = 0
    modules_total: int = 0
    passthrough_checked: int = 0
    other_files_checked: int = 0  # config, tokenizer...: copied as they are
    files_hashed: int = 0
    manifest: bool = True  # False: converted with --no-checksums, so there are no sums to check
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.ok = False
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(message)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def verify_conversion(
    src: Path | str,
    dst: Path | str,
    sample: float = 1.0,
    seed: int = 0,
    numeric: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Check that ``dst`` is a correct conversion of ``src``.

    Args:
        src: the source checkpoint.
        dst: the converted checkpoint.
        sample: fraction of W4A8 modules (and of files for the checksums) to check; 1.0 checks all.
        seed: chooses the sample (and the random activations of ``numeric``).
        numeric: also run the CPU reference of the Ascend operators (``w4a8conv.reference``) on the
            output's tensors with random int8 activations, and compare with a float computation
            from the source's int4 values and scales, for every checked Linear and MoE layer.
        progress: receives a report per file hashed, tensor compared and module checked.
        workers: threads checking in parallel (default :data:`DEFAULT_WORKERS`); the report is the
            same for any number.

    Returns:
        A report; ``ok`` is False and ``problems`` says why when anything is wrong.

    Raises:
        BadInputError: when ``src`` or ``dst`` cannot be read at all.
    """
    if not 0 < sample <= 1:
        raise BadInputError(f"--sample {sample}: must be in (0, 1]")
    if workers is not None and workers < 1:
        raise BadInputError(f"--workers {workers}: need at least 1")
    src, dst = Path(src), Path(dst)
    report = VerifyReport()
    source = open_checkpoint(src)
    description = _load_json(dst / DESCRIPTION_FILE)
    if not isinstance(description, dict) or not isinstance(description.get(TOOL_SECTION), dict):
        raise BadInputError(f"{dst / DESCRIPTION_FILE}: not a finished w4a8conv output")
    section = description[TOOL_SECTION]
    if (dst / STATE_DIR).exists():
        report.problem(f"{dst / STATE_DIR}: conversion state left behind; the output was not finalized")
    rng = random.Random(seed)
    progress = progress or Progress()
    headers = _check_index(dst, report)
    out_tensors = {name: info for h in headers.values() for name, info in h.tensors.items()}
    src_types = _tensor_types(source.description)
    prefixes = sorted(
        n[: -len(".weight")] for n, t in src_types.items() if t == "W4A8_DYNAMIC" and n.endswith(".weight")
    )
    consumed = {f"{p}.{r}" for p in prefixes for r in _ROLES}
    out_types = _tensor_types(description)
    report.modules_total = len(prefixes)
    chosen = prefixes if sample >= 1 else rng.sample(prefixes, max(1, math.ceil(sample * len(prefixes))))
    progress.start(sum(h.file_size for h in headers.values()) + source.total_bytes, len(chosen))
    if set(out_types) != set(out_tensors):
        extra = sorted(set(out_types) ^ set(out_tensors))[:1]
        report.problem(f"{dst / DESCRIPTION_FILE}: types and tensors differ, e.g. {extra[0]}")
    for name in sorted(set(src_types) - set(source.tensors)):
        report.problem(f"{src / DESCRIPTION_FILE}: lists tensor {name}, which no shard holds")
    modules = set(prefixes)
    for name, quant_type in sorted(out_types.items()):
        # a serving engine picks the processed loading by this type (headers only: checked in full)
        if name.rpartition(".")[0] in modules and quant_type != PREPACKED_TYPE:
            report.problem(f"{dst / DESCRIPTION_FILE}: {name} is described as {quant_type!r}, not {PREPACKED_TYPE!r}")
    if prefixes:
        _check_description_keys(
            dst / DESCRIPTION_FILE, source.description, description, source.tensors, prefixes[0], report
        )

    def check_passthrough(info: TensorInfo, found: VerifyReport) -> None:
        _check_passthrough(info, out_tensors.get(info.name), out_types.get(info.name), src_types.get(info.name), found)

    def check_module(prefix: str, found: VerifyReport) -> None:
        try:
            _check_module(prefix, source.tensors, out_tensors, section, found)
        except (KeyError, ValueError) as e:
            found.problem(f"{prefix}: cannot be checked ({e})")

    with ThreadPoolExecutor(workers or DEFAULT_WORKERS, thread_name_prefix="verify") as pool:
        if not has_manifest(description) and not (dst / MANIFEST_FILE).exists():
            report.manifest = False
            # what the manifest check would flag as unlisted, so that the verdict does not depend on it
            written = {*headers, DESCRIPTION_FILE, *(p.name for p in dst.glob(f"*{INDEX_SUFFIX}"))}
            for name in sorted(_output_files(dst) - written - {str(rel) for rel in source.extra_files}):
                report.problem(f"{dst / name}: not part of the conversion")
        else:
            _check_manifest(dst, sample, rng, report, progress, pool)
        for rel in source.extra_files:
            report.other_files_checked += 1
            _check_copied_file(src / rel, dst / rel, report)
        passthrough = [info for name, info in sorted(source.tensors.items()) if name not in consumed]
        for info in _in_order(pool, passthrough, check_passthrough, report):
            report.passthrough_checked += 1
            progress.update("copy", info.name, info.nbytes)
        for prefix in _in_order(pool, chosen, check_module, report):
            report.modules_checked += 1
            progress.update("module", prefix, sum(info.nbytes for _, info in _sources(prefix, source.tensors)))
    if numeric and report.ok:
        _numeric_checks(dst, chosen, source.tensors, section, np.random.default_rng(seed), report)
    return report


def _in_order(pool: ThreadPoolExecutor, items: list, check: Callable, report: VerifyReport) -> Iterator:
    """Run ``check(item, found)`` for every item on ``pool``; yield the items in order, their problems reported.

    Each check collects into a report of its own, so the problems come out in the same order
    whatever the number of threads.
    """

    def run(item) -> list[str]:
        found = VerifyReport()
        check(item, found)
        return found.problems

    for item, problems in zip(items, pool.map(run, items), strict=True):
        for problem in problems:
            report.problem(problem)
        yield item


def _tensor_types(description: dict) -> dict[str, str]:
    """A description's per-tensor types (its top-level keys, such as ``version``, carry no dot)."""
    return {k: v for k, v in description.items() if "." in k and isinstance(v, str)}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read ({e})") from e


def _check_description_keys(
    path: Path, source_description: dict, description: dict, src: dict[str, TensorInfo], prefix: str, report
) -> None:
    """The keys a loader reads besides the types: the source's own, with the group size it implies
    (vllm-ascend reads ``group_size``; :mod:`w4a8conv.runtime` the section's size and layout)."""
    try:
        weight, n = src[f"{prefix}.weight"], src[f"{prefix}.weight_scale"].shape[0]
        second = src.get(f"{prefix}.weight_scale_second")
        group_size = weight.shape[1] // second.shape[1] if second is not None else 0
    except (KeyError, IndexError, ZeroDivisionError) as e:
        report.problem(f"{prefix}: the source's shapes give no group size ({e!r})")
        return
    per_group = "v1.0.0-per-group" if group_size else "v1.0.0-per-channel"
    layout = per_group if _two_per_byte(weight.shape, n) else "mindie"

    def others(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in _tensor_types(d) and k != TOOL_SECTION}

    def compare(got: dict, expected: dict, where: str) -> None:
        missing = object()
        for key in sorted(set(expected) | set(got)):
            pair = got.get(key, missing), expected.get(key, missing)
            if pair[0] != pair[1]:
                shown = ["absent" if value is missing else repr(value) for value in pair]
                report.problem(f"{path}: {where}{key} is {shown[0]}, expected {shown[1]}")

    compare(others(description), {**others(source_description), "group_size": group_size}, "")
    section = description[TOOL_SECTION]
    expected = {
        "group_size": group_size,
        "source_layout": layout,
        "source_version": source_description.get("version"),
        "quant_type": PREPACKED_TYPE,
    }
    compare({key: section[key] for key in expected if key in section}, expected, f"{TOOL_SECTION}.")


def _check_index(dst: Path, report: VerifyReport) -> dict[str, ShardHeader]:
    indexes = sorted(dst.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) != 1:
        raise BadInputError(f"{dst}: expected one {INDEX_SUFFIX}, found {len(indexes)}")
    index = _load_json(indexes[0])
    weight_map = index.get("weight_map", {})
    headers = {name: read_header(dst / name) for name in sorted(set(weight_map.values()))}
    actual = {t: f for f, h in headers.items() for t in h.tensors}
    if actual != weight_map:
        wrong = sorted(set(actual.items()) ^ set(weight_map.items()))[:1]
        report.problem(f"{indexes[0]}: weight_map disagrees with the shards, e.g. {wrong[0][0]}")
    total = sum(i.nbytes for h in headers.values() for i in h.tensors.values())
    if index.get("metadata", {}).get("total_size") != total:
        report.problem(
            f"{indexes[0]}: total_size {index.get('metadata', {}).get('total_size')} but tensors hold {total}"
        )
    return headers


def _sources(prefix: str, tensors: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    return [(role, tensors[f"{prefix}.{role}"]) for role in _ROLES if f"{prefix}.{role}" in tensors]


def _check_manifest(
    dst: Path, sample: float, rng: random.Random, report: VerifyReport, progress: Progress, pool: ThreadPoolExecutor
) -> None:
    path = dst / MANIFEST_FILE
    if not path.is_file():
        report.problem(f"{path}: checksum manifest missing")
        return
    listed = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = _output_files(dst)
    for name in sorted(present - set(listed)):
        report.problem(f"{dst / name}: not in {MANIFEST_FILE}")
    names = sorted(set(listed) & present)
    if sample < 1:
        names = rng.sample(names, max(1, math.ceil(sample * len(names)))) if names else []
    for name in sorted(set(listed) - present):
        report.problem(f"{dst / name}: listed in {MANIFEST_FILE} but missing")
    for name, digest in zip(names, pool.map(sha256_file, [dst / name for name in names]), strict=True):
        report.files_hashed += 1
        if digest != listed[name]:
            report.problem(f"{dst / name}: sha256 differs from {MANIFEST_FILE}")
        progress.update("copy", name, (dst / name).stat().st_size)


def _output_files(dst: Path) -> set[str]:
    """Paths of the files in an output, relative to it, but for the manifest and hidden files."""
    return {
        str(p.relative_to(dst))
        for p in dst.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not any(part.startswith(".") for part in p.relative_to(dst).parts)
    }


def _check_copied_file(src: Path, out: Path, report: VerifyReport) -> None:
    """A file that the conversion copies as it is must be there, byte for byte; the manifest only says
    it has not changed since the conversion, and without one nothing else would look at it."""
    if not out.is_file():
        report.problem(f"{out}: missing (the input has {src})")
        return
    try:
        same = filecmp.cmp(src, out, shallow=False)
    except OSError as e:
        report.problem(f"{e.filename}: cannot read: {e.strerror}")
        return
    if not same:
        report.problem(f"{out}: differs from {src}")


def _check_passthrough(src: TensorInfo, out: TensorInfo | None, out_type, src_type, report: VerifyReport) -> None:
    if out is None:
        report.problem(f"{src.name}: in the source, missing from the output")
        return
    if (src.dtype, src.shape) != (out.dtype, out.shape):
        report.problem(
            f"{out.path}: tensor {out.name}: {out.dtype}{list(out.shape)}, source {src.dtype}{list(src.shape)}"
        )
        return
    if out_type != src_type:
        report.problem(f"{out.name}: described as {out_type!r}, source says {src_type!r}")
    if not _same_bytes(src, out):
        report.problem(f"{out.path}: tensor {out.name}: bytes differ from the source")


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two tensors of equal size hold the same bytes, compared a chunk at a time in reused buffers."""
    chunks = [bytearray(min(_COMPARE_CHUNK, a.nbytes)) for _ in range(2)]
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        for offset in range(0, a.nbytes, _COMPARE_CHUNK):
            size = min(_COMPARE_CHUNK, a.nbytes - offset)
            for f, info, chunk in ((fa, a, chunks[0]), (fb, b, chunks[1])):
                if os.preadv(f.fileno(), [memoryview(chunk)[:size]], info.begin + offset) != size:
                    return False  # a file ends inside the tensor
            whole = size == len(chunks[0])  # else the last, short chunk: compare copies of its part
            if not (chunks[0] == chunks[1] if whole else chunks[0][:size] == chunks[1][:size]):
                return False
    return True


def _array(info: TensorInfo) -> np.ndarray:
    if info.dtype == "BF16":  # numpy has no bfloat16: widen the bits to float32
        raw = np.fromfile(info.path, dtype=np.uint16, count=info.nbytes // 2, offset=info.begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    # Large tensors bypass the page cache (O_DIRECT): at 8 GB, reading through the cache cost as
    # much system time as the checks' own arithmetic.
    return read_array(info, direct=True).view(_NUMPY[info.dtype]).reshape(info.shape)


def _signed_nibble(packed: np.ndarray, position: int) -> np.ndarray:
    """Nibble ``position`` (0: the lowest 4 bits) of each unsigned integer in ``packed``, as -8..7.

    Shifted to the top of the integer, then arithmetically back down, which sign-extends it.
    """
    bits = packed.dtype.itemsize * 8
    return (packed << (bits - 4 - 4 * position)).view(f"int{bits}") >> (bits - 4)


def _operator_words(raw: np.ndarray, out_features: int) -> np.ndarray:
    """The operator words, transposed (uint32 ``[out/8, in]``), that hold a source weight's int4 values.

    Built from the format's definition: value ``8m+j`` in bits ``4j..4j+3`` of word m. A 1.0.0
    byte holds values 2i (low nibble) and 2i+1, so word m is bytes 4m..4m+3, the first lowest; a
    mindie byte holds one value (-8..7, checked by the caller). Comparing words, not values
    unpacked from them, keeps the comparison at a quarter of a byte per value.
    """
    unsigned = raw.view(np.uint8)
    # In place, with no zeroed memory: fresh pages cost more in faults than the arithmetic here.
    words = np.empty((out_features // 8, raw.shape[1]), dtype=np.uint32)
    part = np.empty_like(words)
    pieces = 4 if _two_per_byte(raw.shape, out_features) else 8
    for i in range(pieces):
        part[...] = unsigned[i::pieces]
        if pieces == 8:
            part &= 0xF
        part <<= 32 // pieces * i
        if i:
            words |= part
        else:
            words[...] = part
    return words


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` (round to nearest even) and back to float32."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _source_module(prefix: str, src: dict[str, TensorInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 values int16 ``[out, in]``, weight_scale float32 ``[out]``, weight_scale_second or None."""
    scale, second = _source_scales(prefix, src)
    return _int4_values(_array(src[f"{prefix}.weight"]), scale.size), scale, second


def _check_offsets(prefix: str, src: dict[str, TensorInfo], report: VerifyReport) -> None:
    """Non-zero offsets (asymmetric quantization): no output can be a correct conversion of such a source."""
    for role in ("weight_offset", "weight_offset_second"):
        info = src.get(f"{prefix}.{role}")
        if info is not None and np.any(_array(info)):
            report.problem(f"{info.path}: tensor {info.name}: non-zero offsets, which W4A8_DYNAMIC cannot hold")


def _check_finite(info: TensorInfo, values: np.ndarray | None, report: VerifyReport) -> None:
    """A NaN or Inf source scale: no conversion may carry it, and NaN would slip past every comparison."""
    if values is not None and not np.all(np.isfinite(values)):
        report.problem(f"{info.path}: tensor {info.name}: holds NaN or Inf")


def _source_scales(prefix: str, src: dict[str, TensorInfo]) -> tuple[np.ndarray, np.ndarray | None]:
    """weight_scale float32 ``[out]`` and weight_scale_second float32 ``[out, in/g]`` or None."""
    scale = _array(src[f"{prefix}.weight_scale"]).astype(np.float32).reshape(-1)
    second_info = src.get(f"{prefix}.weight_scale_second")
    return scale, _array(second_info).astype(np.float32) if second_info is not None else None


def _two_per_byte(weight_shape: tuple[int, ...], out_features: int) -> bool:
    """Whether a source weight of this shape holds two int4 values per byte along out (1.0.0) or one (mindie)."""
    return weight_shape[0] * 2 == out_features


def _int4_values(raw: np.ndarray, out_features: int) -> np.ndarray:
    """A source weight's int4 values, int16 ``[out, in]``."""
    if not _two_per_byte(raw.shape, out_features):
        return raw.astype(np.int16)  # mindie: one value per byte
    # 1.0.0: two int4 per byte along out, even row in the low nibble
    values = np.empty((out_features, raw.shape[1]), dtype=np.int16)
    values[0::2] = _signed_nibble(raw.view(np.uint8), 0)
    values[1::2] = _signed_nibble(raw.view(np.uint8), 1)
    return values


def _kernel_scale(prefix: str, scale: np.ndarray, second: np.ndarray | None, params_dtype: str) -> np.ndarray:
    """The per-group (or per-channel) scale ``[out, groups]`` the Ascend kernel applies, float32."""
    if _MOE.search(prefix) is None:
        return _round_to(scale, params_dtype)[:, None] * _round_to(second, params_dtype)
    if second is None:
        return scale[:, None]
    return (scale[:, None] * second).astype(np.float16).astype(np.float32)


def _check_module(prefix: str, src: dict[str, TensorInfo], out: dict[str, TensorInfo], section, report) -> None:
    where = prefix
    _check_offsets(prefix, src, report)
    scale, second = _source_scales(prefix, src)
    _check_finite(src[f"{prefix}.weight_scale"], scale, report)
    if second is not None:
        _check_finite(src[f"{prefix}.weight_scale_second"], second, report)
    source = src[f"{prefix}.weight"]
    raw = _array(source)
    n, k = scale.size, raw.shape[1]
    words = _array(out[f"{prefix}.weight"]).view(np.uint32)  # [in, out/8]
    if not _two_per_byte(raw.shape, n) and (raw.min() < -8 or raw.max() > 7):
        report.problem(f"{source.path}: tensor {source.name}: values outside the int4 range -8..7")
    elif words.shape != (k, n // 8) or not np.array_equal(np.ascontiguousarray(words.T), _operator_words(raw, n)):
        report.problem(f"{out[f'{prefix}.weight'].path}: tensor {prefix}.weight: int4 values differ from the source")

    is_moe = _MOE.search(prefix) is not None
    if is_moe:
        encoded = _array(out[f"{prefix}.weight_scale"]).view(np.uint64)
        if np.any(encoded >> np.uint64(32)):
            report.problem(f"{prefix}.weight_scale: int64 scale has high bits set")
        low = (encoded & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        if second is not None:
            expected = (scale[:, None] * second).astype(np.float16).astype(np.float32).T
        else:
            expected = scale[None, :]
        if low.shape != expected.shape or not np.array_equal(low, expected.view(np.uint32)):
            report.problem(f"{prefix}.weight_scale: differs from the source scales (fp32 bits)")
        used_scale, used_second = scale, second
    else:
        dtype = section.get("params_dtype", "bfloat16")
        used_scale, used_second = _round_to(scale, dtype), _round_to(second, dtype)
        expected = (used_scale[:, None] * used_second).astype(np.float32).T
        got = _array(out[f"{prefix}.weight_scale_second"])
        if got.shape != expected.shape or not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
            report.problem(f"{prefix}.weight_scale_second: differs from the source scales")

    bias = _array(out[f"{prefix}.scale_bias"])
    stored = src.get(f"{prefix}.scale_bias")
    if stored is not None:
        stored_values = _array(stored)
        _check_finite(stored, stored_values, report)
        if not np.array_equal(bias.reshape(-1), stored_values.astype(np.float32).reshape(-1)):
            report.problem(f"{prefix}.scale_bias: differs from the stored scale_bias")
        return
    values = _int4_values(raw, n)
    chunks = bias.shape[1]
    # The converter sums in float64 in another order and rounds to fp32 once: the result may differ
    # by one fp32 step, plus float64 rounding that can only matter where terms cancel (a few 1e-16
    # of the terms' magnitude per addition; at most ~10,000 additions).
    expected, tolerance = np.empty((n, chunks)), np.empty((n, chunks))
    # Every term in float64, a few rows at a time: whole-matrix temporaries (three of 8 bytes per
    # value) made `verify` of a mindie checkpoint spend as much time in page faults as in arithmetic.
    for start in range(0, n, _BIAS_ROWS):
        rows = slice(start, start + _BIAS_ROWS)
        group_scale = used_scale[rows, None].astype(np.float64) * used_second[rows].astype(np.float64)
        terms = _dequantized(values[rows], group_scale).reshape(-1, chunks, k // chunks)
        expected[rows] = 8 * terms.sum(-1)
        tolerance[rows] = 2e-12 * 8 * np.abs(terms).sum(-1)
    tolerance += np.spacing(np.abs(expected).astype(np.float32))
    if bias.shape != (n, chunks) or np.any(~(np.abs(bias - expected) <= tolerance)):
        report.problem(f"{where}.scale_bias: differs from 8 * sum(w * s) recomputed in float64")


_NUMERIC_TOKENS = 4
_NUMERIC_EXPERTS = 4  # experts routed to per MoE layer: enough to exercise w13, SwiGLU and w2
# Relative error allowed (measured on the synthetic checkpoints: matmuls up to 4e-4, layers 6e-3). A
# matmul's only inexact part is scale_bias: rounded to fp32, and for 1.0.0
# computed by msModelSlim from bf16 scales (0.4% of a term), while the kernel's scales are fp16.
_MATMUL_TOLERANCE = 5e-3
_LAYER_TOLERANCE = 5e-2


def _numeric_checks(dst: Path, prefixes: list[str], src, section, rng, report: VerifyReport) -> None:
    import torch

    from . import reference
    from .runtime import ProcessedCheckpoint

    ckpt = ProcessedCheckpoint(dst)
    params_dtype = section.get("params_dtype", "bfloat16")
    layers: dict[str, set[int]] = {}
    for prefix in prefixes:
        match = re.match(r"(.+\.experts)\.(\d+)\.", prefix + ".")
        if match:
            layers.setdefault(match[1], set()).add(int(match[2]))
            continue
        values, scale, second = _source_module(prefix, src)
        x, pts = _activations(rng, values.shape[1])
        expected = _float_matmul(x, pts, values, _kernel_scale(prefix, scale, second, params_dtype))
        got = reference.linear(torch.from_numpy(x), torch.from_numpy(pts), ckpt.load_linear(prefix)).numpy()
        _compare(prefix, got, expected, _MATMUL_TOLERANCE, report)
    for layer, experts in sorted(layers.items()):
        chosen = sorted(experts)[:_NUMERIC_EXPERTS]
        values, kernel = {}, {}
        for e in chosen:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"{layer}.{e}.{proj}"
                v, s1, s2 = _source_module(prefix, src)
                values[(e, proj)], kernel[(e, proj)] = v, _kernel_scale(prefix, s1, s2, params_dtype)
        hidden = values[(chosen[0], "gate_proj")].shape[1]
        x, pts = _activations(rng, hidden)
        top_k = min(2, len(chosen))
        slots = np.stack([rng.permutation(len(chosen))[:top_k] for _ in range(_NUMERIC_TOKENS)])
        weights = rng.uniform(0.1, 1.0, size=slots.shape)
        expected = np.zeros((_NUMERIC_TOKENS, hidden))
        for t in range(_NUMERIC_TOKENS):
            for slot, weight in zip(slots[t], weights[t], strict=True):
                e = chosen[slot]
                g = _float_matmul(x[t : t + 1], pts[t : t + 1], values[(e, "gate_proj")], kernel[(e, "gate_proj")])
                u = _float_matmul(x[t : t + 1], pts[t : t + 1], values[(e, "up_proj")], kernel[(e, "up_proj")])
                act = g / (1 + np.exp(-g)) * u
                q_scale = np.maximum(np.abs(act).max(-1), 1e-12) / 127.0
                q = np.clip(np.round(act / q_scale[:, None]), -128, 127)
                expected[t] += weight * _float_matmul(q, q_scale, values[(e, "down_proj")], kernel[(e, "down_proj")])[0]
        tensors = ckpt.load_moe(layer, experts=chosen)
        for slot, e in enumerate(chosen):  # each matmul alone: tight, a wrong bias or scale shows
            gate_up = (e, "gate_proj"), (e, "up_proj")
            w13_values = np.concatenate([values[key] for key in gate_up])
            w13_scale = np.concatenate([kernel[key] for key in gate_up])
            _check_matmul(f"{layer}.{e} w13", w13_values, w13_scale, tensors, "w13", slot, rng, report)
            down = (e, "down_proj")
            _check_matmul(f"{layer}.{e} w2", values[down], kernel[down], tensors, "w2", slot, rng, report)
        got = reference.moe(
            torch.from_numpy(x), torch.from_numpy(pts), torch.from_numpy(slots), torch.from_numpy(weights), tensors
        ).numpy()
        # The whole layer: routing, SwiGLU and the int8 re-quantization between w13 and w2, where a
        # last-bit difference moves a value across a rounding step; hence the looser tolerance.
        _compare(f"{layer} (experts {chosen})", got, expected, _LAYER_TOLERANCE, report)


def _check_matmul(what, values, scale, tensors, fused: str, slot: int, rng, report: VerifyReport) -> None:
    """One expert's w13 or w2 alone against the float computation from the source."""
    import torch

    from . import reference

    x, pts = _activations(rng, values.shape[1])
    got = reference.w4a8_matmul(
        torch.from_numpy(x),
        torch.from_numpy(pts),
        tensors[f"{fused}_weight"][slot],
        tensors[f"{fused}_weight_scale"][slot],
        tensors[f"{fused}_scale_bias"][slot],
    ).numpy()
    _compare(what, got, _float_matmul(x, pts, values, scale), _MATMUL_TOLERANCE, report)


def _activations(rng, width: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(-128, 128, size=(_NUMERIC_TOKENS, width), dtype=np.int8)
    return x, rng.uniform(0.01, 0.06, size=_NUMERIC_TOKENS)


def _float_matmul(x: np.ndarray, pts: np.ndarray, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``pts * (x @ (values * scale).T)`` in float64, ``scale`` ``[out, groups]`` per group of columns.

    A block of output rows at a time: a whole float64 weight matrix (118 MB for a DeepSeek-R1
    expert projection) is fresh memory on every call, and its page faults cost more than the matmul.
    """
    n = values.shape[0]
    x = x.astype(np.float64)
    out = np.empty((x.shape[0], n))
    for start in range(0, n, _MATMUL_ROWS):
        rows = slice(start, start + _MATMUL_ROWS)
        out[:, rows] = x @ _dequantized(values[rows], scale[rows]).T
    return pts.reshape(-1, 1) * out


def _dequantized(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``values * scale`` in float64, ``[rows, in]``, ``scale`` ``[rows, groups]`` applying to groups of columns."""
    rows, k = values.shape
    weights = values.astype(np.float64).reshape(rows, scale.shape[1], k // scale.shape[1])
    weights *= scale.astype(np.float64)[:, :, None]  # in place: one float64 matrix, not three
    return weights.reshape(rows, k)


def _compare(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float, report: VerifyReport) -> None:
    report.numeric_checks += 1
    error = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    if not error <= tolerance:
        report.problem(f"{what}: operator reference differs from the float computation (relative error {error:.2e})")
