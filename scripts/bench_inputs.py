"""The bench's inputs: synthetic DeepSeek-R1-shaped checkpoints, a header-only DeepSeek-R1, and the naive
seed-style converter the conversion is compared with (see bench.py).

    python scripts/bench_inputs.py --generate DIR LAYOUT LAYERS   # one synthetic checkpoint
    python scripts/bench_inputs.py --naive SRC DST                # the naive conversion
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from w4a8conv.formats.sources import get_source

HIDDEN, INTER, GROUP, EXPERTS = 7168, 2048, 256, 16


def _spec(layers: int):
    from w4a8conv.synthetic import SyntheticSpec

    return SyntheticSpec(
        hidden=HIDDEN,
        intermediate=INTER,
        experts=EXPERTS,
        dense_layers=0,
        moe_layers=layers,
        group_size=GROUP,
        vocab=1024,
        w4a8_linear=False,
        # One MTP layer (0.7 GB of W8A8 experts here) and QuaRot's 7168^2 fp32 rotation (0.2 GB) are a
        # 62nd and a 2,000th of DeepSeek-R1, but a third of a 2 GB bench input: left out, so that the
        # input's mix of converted and copied bytes is the real one.
        mtp_layers=0,
        quarot=False,
    )


def _layer_bytes(layout: str) -> int:
    expert = 3 * INTER * HIDDEN * (0.5 if get_source(layout).packed_on_disk else 1)
    # MLA attention as synthetic writes it (four int8 [H, H] projections, kv_b_proj bf16) + the shared expert
    passthrough = 6 * HIDDEN * HIDDEN + 3 * INTER * HIDDEN
    return int(EXPERTS * expert + passthrough)


def ensure_checkpoint(data: Path, layout: str, size_gb: float) -> Path:
    layers = max(1, round(size_gb * 1e9 / _layer_bytes(layout)))
    # "-mss2": written as msModelSlim writes (MLA...), since issue 16; older caches are not reused
    path = data / f"{layout}-{layers}layers-mss2"
    # written last: the description, or for a config-described layout its tokenizer config
    last = "tokenizer_config.json" if get_source(layout).described_by_config else "quant_model_description.json"
    if (path / last).is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    # In a child process: the parent stays small, so the peak RSS it measures for its children
    # (which start as forks of it) is theirs.
    subprocess.run([sys.executable, __file__, "--generate", str(path), layout, str(layers)], check=True)
    return path


def ensure_family_checkpoint(data: Path, family: str, size_gb: float) -> Path:
    """A model family's per-channel checkpoint (msModelSlim's current saver) of about ``size_gb``, in the
    family's own names and public shapes, as `w4a8conv synthetic --family F --size-gb N` writes it."""
    path = data / f"family-{family}-{size_gb:g}gb"
    if (path / "quant_model_description.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    cli = str(Path(sys.executable).parent / "w4a8conv")
    command = [cli, "synthetic", str(path), "--family", family, "--size-gb", str(size_gb)]
    subprocess.run([*command, "--layout", "v1.0.0-per-channel", "-q"], check=True)
    return path


# --- the naive, seed-style reference ---------------------------------------------------------------


def naive_convert(src: Path, dst: Path) -> None:
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads(next(src.glob("*.safetensors.index.json")).read_text())["weight_map"]
    description = json.loads((src / "quant_model_description.json").read_text())
    new_version = description.get("version") == "1.0.0"
    group_size = description.get("group_size", GROUP)
    dst.mkdir(parents=True)

    def load(names):
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(index[name], []).append(name)
        out = {}
        for file_name, file_names in by_file.items():
            with safe_open(str(src / file_name), framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in file_names})
        return out

    def naive_pack(w: torch.Tensor) -> torch.Tensor:  # numpy emulation of npu_quantize(quint4x2)
        v = w.numpy().astype(np.int64)
        groups = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
        word = np.zeros(groups.shape[:-1], dtype=np.int64)
        for j in range(8):
            word |= (groups[..., j] & 0xF) << (4 * j)
        return torch.from_numpy(np.where(word >= 2**31, word - 2**32, word).astype(np.int32))

    def process_scale(weight, scale, per_group_scale):
        scale = scale.transpose(1, 2).contiguous()
        if per_group_scale is None:
            s = scale.numpy().copy()
            s.dtype = np.uint32
            return torch.from_numpy(s.astype(np.int64)), None
        per_group_scale = per_group_scale.transpose(1, 2).contiguous()
        e, k, n = weight.shape
        n = n * 2 if new_version else n
        per_group_scale = per_group_scale.reshape(e, -1, n)
        _, groups, n = per_group_scale.shape
        bias = None
        if not new_version:
            high = weight.to(torch.float32).reshape(e, groups, -1, n) * per_group_scale.reshape(e, groups, 1, n)
            bias = 8 * (high.reshape(e, k, n) * scale).sum(axis=1)
        s = (scale * per_group_scale).to(torch.float16).to(torch.float32).numpy().copy()
        s.dtype = np.uint32
        wide = np.zeros((e, groups, n * 2), dtype=np.uint32)
        wide[..., ::2] = s
        return torch.from_numpy(np.frombuffer(wide.tobytes(), dtype=np.int64).copy()).reshape(e, groups, n), bias

    layers: dict[str, set[int]] = {}
    others = []
    for name in index:
        m = re.match(r"(.+\.experts)\.(\d+)\.", name)
        if m and description.get(name) == "W4A8_DYNAMIC":  # not the MTP layer's W8A8 experts
            layers.setdefault(m[1], set()).add(int(m[2]))
        else:
            others.append(name)
    for n, layer in enumerate(sorted(layers)):
        experts = sorted(layers[layer])
        t = load([k for k in index if k.startswith(layer + ".")])

        def stack(proj_names, role, experts=experts, layer=layer, t=t):
            return torch.stack([torch.cat([t[f"{layer}.{e}.{p}.{role}"] for p in proj_names]) for e in experts]).to(
                torch.float32 if role != "weight" else torch.int8
            )

        out = {}
        for prefix, projs in (("w13", ("gate_proj", "up_proj")), ("w2", ("down_proj",))):
            weight = stack(projs, "weight").transpose(1, 2).contiguous()
            second = stack(projs, "weight_scale_second") if group_size else None
            scale, bias = process_scale(weight, stack(projs, "weight_scale"), second)
            if new_version:
                bias = stack(projs, "scale_bias").transpose(1, 2).contiguous().sum(axis=1)
                packed = torch.from_numpy(np.frombuffer(weight.numpy().tobytes(), dtype=np.int32).copy())
                packed = packed.reshape(*weight.shape[:-1], -1)
            else:
                packed = naive_pack(weight)
            out.update({f"{prefix}_weight": packed, f"{prefix}_weight_scale": scale, f"{prefix}_scale_bias": bias})
        save_file({f"{layer}.{k}": v.contiguous() for k, v in out.items()}, str(dst / f"layer-{n}.safetensors"))
    save_file({k: v.contiguous() for k, v in load(others).items()}, str(dst / "others.safetensors"))


def write_header_only_deepseek(path: Path) -> Path:
    """A DeepSeek-R1-sized mindie checkpoint (58 MoE layers x 256 experts, ~650 GB) of sparse files:
    real safetensors headers, index and description, no data. Planning reads nothing else."""
    from w4a8conv.safetensors_io import OutputEntry, layout_header

    if (path / "quant_model_description.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    entries, types = [], {}
    for layer in range(3, 61):
        for e in range(256):
            for proj, n, k in (("gate_proj", INTER, HIDDEN), ("up_proj", INTER, HIDDEN), ("down_proj", HIDDEN, INTER)):
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                for suffix, dtype, shape in (
                    ("weight", "I8", (n, k)),
                    ("weight_scale", "F32", (n, 1)),
                    ("weight_offset", "F32", (n, 1)),
                    ("weight_scale_second", "F32", (n, k // GROUP)),
                    ("weight_offset_second", "I64", (n, k // GROUP)),
                ):
                    entries.append(OutputEntry(f"{prefix}.{suffix}", dtype, shape))
                    types[f"{prefix}.{suffix}"] = "W4A8_DYNAMIC"
    shards: list[list] = [[]]
    filled = 0
    for entry in entries:
        if filled > 4 << 30:  # 4 GiB shards, as msModelSlim writes them
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += entry.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"quant_model_weight_w8a8_dynamic-{i:05d}-of-{len(shards):05d}.safetensors"
        header, _ = layout_header(shard)
        with open(path / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(e.nbytes for e in shard))  # sparse: no data written
        weight_map.update(dict.fromkeys((e.name for e in shard), name))
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (path / "quant_model_weight_w8a8_dynamic.safetensors.index.json").write_text(json.dumps(index))
    (path / "quant_model_description.json").write_text(json.dumps({"model_quant_type": "W8A8_DYNAMIC", **types}))
    return path


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--generate":
        from w4a8conv.synthetic import write_checkpoint

        write_checkpoint(Path(sys.argv[2]), sys.argv[3], _spec(int(sys.argv[4])), shard_bytes=1 << 30)
    elif len(sys.argv) == 4 and sys.argv[1] == "--naive":
        naive_convert(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
