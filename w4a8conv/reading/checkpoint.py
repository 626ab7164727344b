"""Reading a checkpoint directory: description, index, shard headers and the files beside them.

Only headers are read here; no tensor data. Symlinks are followed only while they stay inside the
checkpoint directory.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from ..names import CONFIG_FILE, DESCRIPTION_FILE, INDEX_SUFFIX, STATE_DIR
from ..safetensors_io import ShardHeader, TensorInfo, file_identity, read_header
from .gc_hold import holding_gc
from .job_file import resume_command
from .quantization_config import description_from_config, is_compressed_tensors, served_config

if TYPE_CHECKING:
    import torch

_MODEL_DTYPES = ("bfloat16", "float16", "float32")
# A DeepSeek-R1 mindie description or index is about 20 MB (about 230,000 tensor names); a JSON file
# past this is no description, index or config, and reading it whole would cost its size in memory.
MAX_JSON_BYTES = 64 << 20


@dataclass
class Checkpoint:
    """A checkpoint directory as read from its headers.

    Attributes:
        root: the directory.
        description: ``quant_model_description.json`` as a dict.
        prefix: the shard prefix, so that the index is ``<prefix>.safetensors.index.json``.
        shards: headers of every shard, by file name.
        tensors: every tensor by name.
        extra_files: paths (relative to root) of the other files, e.g. config and tokenizer.
        config: ``config.json``, if any.
        description_path: the description file read (msModelSlim's old API names it after the quant
            type, ``quant_model_description_w4a8_dynamic.json``); None where config.json describes it.
        served_config: for a compressed-tensors source (described by its ``config.json``), the
            ``config.json`` the output is served with; None where ``config.json`` is copied as it is.
    """

    root: Path
    description: dict[str, Any]
    prefix: str
    shards: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]
    extra_files: list[Path] = field(default_factory=list)
    config: dict[str, Any] | None = None
    served_config: dict[str, Any] | None = None
    description_path: Path | None = None
    dtype: str | None = None  # --dtype: the model dtype, instead of config.json's

    @property
    def total_bytes(self) -> int:
        return sum(s.file_size for s in self.shards.values())

    def input_identities(self) -> dict[str, str]:
        """Every file a conversion reads or copies, relative to the root, with what identifies its version
        (:func:`~.safetensors_io.file_identity`): a resumed conversion must find each one unchanged."""
        identities = {name: shard.identity for name, shard in self.shards.items()}
        description = self.description_path.name if self.description_path is not None else DESCRIPTION_FILE
        others = [description, CONFIG_FILE, f"{self.prefix}{INDEX_SUFFIX}", *map(str, self.extra_files)]
        for rel in others:
            try:
                identities[rel] = file_identity(os.stat(self.root / rel))
            except FileNotFoundError:
                continue  # no index: a single unsharded file
        return dict(sorted(identities.items()))

    @property
    def params_dtype_name(self) -> str:
        """The model dtype a serving engine creates parameters in: ``--dtype``, else config.json's,
        else bfloat16 (:attr:`dtype_assumed` says why)."""
        return self.dtype or self.declared_dtype or "bfloat16"

    @property
    def declared_dtype(self) -> str | None:
        """The model dtype config.json declares (``torch_dtype``, or ``dtype``), None where it names none."""
        name = (self.config.get("torch_dtype") or self.config.get("dtype")) if self.config else None
        return name if name in _MODEL_DTYPES else None

    @property
    def dtype_assumed(self) -> str | None:
        """Why the model dtype is assumed (no config.json, or no dtype it names), or None where it is known."""
        if self.dtype is not None:
            return None
        if not self.config:
            return f"no {CONFIG_FILE}"
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        if name is None:
            return f"{CONFIG_FILE} names no torch_dtype"
        return None if name in _MODEL_DTYPES else f"{CONFIG_FILE}'s torch_dtype {name!r} is not a model dtype"

    @property
    def params_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.params_dtype_name)


@holding_gc
def open_checkpoint(root: Path, dtype: str | None = None) -> Checkpoint:
    """Read a checkpoint directory's description, index and shard headers.

    ``dtype``: the model dtype to convert for (``--dtype``), instead of config.json's.

    Raises:
        BadInputError: with a one-line message naming the file (and tensor) that is wrong.
    """
    root = Path(root)
    if dtype is not None and dtype not in _MODEL_DTYPES:
        raise BadInputError(f"--dtype {dtype}: choose one of {', '.join(_MODEL_DTYPES)}")
    if not root.is_dir():
        raise BadInputError(f"{root}: not a directory")
    roots = _allowed_roots(root)
    listing = _list(root)
    config = None
    config_path = root / CONFIG_FILE
    if os.path.lexists(config_path):
        config = _read_json(config_path, roots)
    config = config if isinstance(config, dict) else None
    # compressed-tensors: described by its config, unless a description is there too (then the planner
    # refuses the mix: which one the engine reads decides the processing)
    description_path = _description_path(root)
    if description_path is None and not is_compressed_tensors(config):
        if (root / STATE_DIR).is_dir():
            raise BadInputError(unfinished_output(root))
        raise BadInputError(f"{root}: no {DESCRIPTION_FILE}, so this is not an msModelSlim checkpoint")
    description = None if description_path is None else _read_description(description_path, roots)
    index_files = sorted(p for p in listing if p.name.endswith(INDEX_SUFFIX))
    if len(index_files) > 1:
        names = ", ".join(p.name for p in index_files)
        raise BadInputError(f"{root}: more than one safetensors index ({names}); keep the one that belongs")
    if index_files:
        index_path = index_files[0]
        prefix = index_path.name[: -len(INDEX_SUFFIX)]
        shard_names = _read_index(index_path, roots)
    else:
        index_path = None
        files = sorted(p.name for p in listing if p.name.endswith(".safetensors"))
        if not files:
            raise BadInputError(f"{root}: no .safetensors files and no {'<prefix>' + INDEX_SUFFIX}")
        for name in files:
            _utf8_name(root / name)
        shard_names = {name: set() for name in files}
        prefix = files[0][: -len(".safetensors")] if len(files) == 1 else "model"

    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in sorted(shard_names):
        path = _inside(root / name, roots)
        if not os.path.lexists(path):
            raise BadInputError(f"{index_path or root}: names shard {name}, which does not exist")
        _regular_file(path)
        header = read_header(path)
        shards[name] = header
        for tensor_name, info in header.tensors.items():
            if tensor_name in tensors:
                first = tensors[tensor_name].path.name
                raise BadInputError(f"{path}: tensor {tensor_name} is also in {first} (duplicate name)")
            tensors[tensor_name] = info
        for listed in shard_names[name]:
            if listed not in header.tensors:
                raise BadInputError(f"{index_path}: names tensor {listed} in {name}, but {name} does not hold it")
    if index_path is not None:
        listed = {t for names in shard_names.values() for t in names}
        unlisted = sorted(set(tensors) - listed)
        if unlisted:
            raise BadInputError(f"{index_path}: tensor {unlisted[0]} is in a shard but not in the weight_map")

    served = None
    if description is None:  # compressed-tensors: described by its config, which the output rewrites
        description = description_from_config(config, tensors, str(config_path))
        served = served_config(config)
    skip = {DESCRIPTION_FILE, *(shard_names), *([index_path.name] if index_path else [])}
    if description_path is not None:
        skip.add(description_path.name)
    if served is not None:
        skip.add(CONFIG_FILE)
    extra = _extra_files(root, roots, skip, index_path is not None)
    return Checkpoint(
        root=root,
        description=description,
        prefix=prefix,
        shards=shards,
        tensors=tensors,
        extra_files=extra,
        config=config,
        served_config=served,
        description_path=description_path,
        dtype=dtype,
    )


def _regular_file(path: Path) -> None:
    """Refuse what is not a regular file (a FIFO would hang the read, a device never end it)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise BadInputError(f"{path}: not a regular file (a directory, FIFO or device); refusing to read it")


def _read_json(path: Path, roots: tuple[Path, ...]) -> Any:
    """A JSON file of the checkpoint: inside it, regular, at most MAX_JSON_BYTES, UTF-8."""
    _regular_file(_inside(path, roots))
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise BadInputError(f"{path}: larger than {MAX_JSON_BYTES} bytes; not a description, index or config")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from e


def unfinished_output(root: Path) -> str:
    """What to say of an output directory whose conversion has not finished."""
    return (
        f"{root}: an unfinished w4a8conv output (interrupted, or an array's shares not finalized); finish it "
        f"with `{resume_command(root)}`, or `w4a8conv finalize {root}` for an array"
    )


def _description_path(root: Path) -> Path | None:
    """The description: ``quant_model_description.json``, or the one msModelSlim's old API names after
    the quant type (``quant_model_description_w4a8_dynamic.json``) when it is the only one; None without."""
    path = root / DESCRIPTION_FILE
    if os.path.lexists(path):
        return path
    named = sorted(root.glob("quant_model_description_*.json"))
    if len(named) == 1:
        return named[0]
    if named:
        names = ", ".join(p.name for p in named)
        raise BadInputError(f"{root}: several descriptions ({names}), no {DESCRIPTION_FILE}; keep the one that belongs")
    return None


def _read_description(path: Path, roots: tuple[Path, ...]) -> dict[str, Any]:
    description = _read_json(path, roots)
    if not isinstance(description, dict):
        raise BadInputError(f"{path}: expected a JSON object mapping tensor names to quant types")
    return description


def _read_index(index_path: Path, roots: tuple[Path, ...]) -> dict[str, set[str]]:
    index = _read_json(index_path, roots)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{index_path}: no weight_map")
    shard_names: dict[str, set[str]] = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str) or "/" in file_name or "\x00" in file_name or file_name in ("", ".", ".."):
            raise BadInputError(f"{index_path}: tensor {tensor_name} maps to {file_name!r}, not a shard file name")
        shard_names.setdefault(file_name, set()).add(tensor_name)
    return shard_names


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where the checkpoint's files may resolve to: inside it, and for a Hugging Face cache snapshot
    (``hf download`` without ``--local-dir``: ``<repo>/snapshots/<rev>/`` whose files link to
    ``../../blobs/<hash>``) that cache repository's ``blobs``."""
    real = _resolve(root)
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real, (real.parent.parent / "blobs").resolve()
    return (real,)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop
        raise BadInputError(f"{path}: cannot resolve ({e}): a symbolic link loop? remove or replace the link") from None


def _inside(path: Path, roots: tuple[Path, ...]) -> Path:
    """``path`` if it resolves inside the checkpoint (or its cache's blobs), else refuse: never follow
    links out of it."""
    resolved = _resolve(path)
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise BadInputError(
            f"{path}: is a link to {resolved}, outside the checkpoint directory; not following it (copy the "
            "files in with `cp -L`, or download with `hf download --local-dir`)"
        )
    return path


def _list(root: Path) -> list[Path]:
    try:
        return sorted(root.iterdir())
    except OSError as e:
        raise BadInputError(f"{root}: cannot list the directory: {e.strerror}") from None


def _utf8_name(path: Path) -> None:
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{path!s}: the file name is not UTF-8; rename it") from None


def _extra_files(root: Path, roots: tuple[Path, ...], skip: set[str], index_exists: bool) -> list[Path]:
    """The other files to copy, in every subdirectory; one that cannot be read or copied is refused."""

    def unreadable(error: OSError) -> None:
        raise BadInputError(f"{error.filename}: cannot read: {error.strerror}; its files would be missing") from None

    paths: list[Path] = []
    for directory, subdirectories, files in os.walk(root, onerror=unreadable):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        paths.extend(Path(directory) / name for name in files if not name.startswith("."))
    extra: list[Path] = []
    for path in sorted(paths):
        rel = path.relative_to(root)
        if len(rel.parts) == 1 and rel.name in skip:
            continue
        if os.path.isdir(path):
            continue  # a link to a directory: not followed, as before
        _regular_file(_inside(path, roots))
        if index_exists and len(rel.parts) == 1 and rel.name.endswith(".safetensors"):
            raise BadInputError(
                f"{path}: a safetensors file the index does not name; its tensors would be copied beside the "
                "converted ones: remove it, or add it to the index"
            )
        try:
            str(rel).encode("utf-8")
        except UnicodeEncodeError:
            raise BadInputError(f"{root / rel!s}: the file name is not UTF-8; rename it") from None
        try:  # copied at the end of a conversion: an unreadable one is found now, before anything is written
            with open(path, "rb"):
                pass
        except OSError as e:
            raise BadInputError(f"{path}: cannot read: {e.strerror}; it would be missing from the output") from None
        extra.append(rel)
    return extra
