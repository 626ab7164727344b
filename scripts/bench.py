"""Benchmark `w4a8conv convert` against a plain copy and a naive seed-style converter, side by side.

    make bench                                  # about 2 GB per layout, 3 runs each, medians
    make bench BENCH_ARGS="--size-gb 8 --json"

For each layout it writes (once, cached in bench-data/) a synthetic checkpoint with DeepSeek-R1
expert shapes (hidden 7168, moe_intermediate 2048, group_size 256), then runs, alternating and
each in a fresh subprocess after a `sync`: `cp -r` of the directory (the floor for moving those
bytes), `w4a8conv convert`, and the naive reference below. It reports wall time, input GB/s,
CPU seconds, convert/copy and naive/convert ratios and peak RSS (medians), as a table or JSON, and
what any conversion must spend here whatever its code (see `bench_costs`): importing torch, the
manifest's sha256 and the int4 repacking, as a CPU-time floor and that floor over the cores against
the copy. `--flat` also
converts a checkpoint 4x larger to show that peak memory does not grow with size; `--no-checksums`
also times `convert --no-checksums`, to show what the sha256 manifest costs; `--verify` times
`w4a8conv verify` of a conversion (source and output both read from the disk).

`--cache disk` (the default) measures what a checkpoint larger than memory sees: before each
command the input's pages are dropped from the page cache (`posix_fadvise(DONTNEED)`, no root
needed; the tools' own libraries stay cached), and each command is timed until its output is on
the disk (a `sync` after it; `convert` fsyncs its shards itself, `cp` leaves them dirty). The time
`cp` takes to exit is reported too. `--cache memory` leaves the input in the page cache and stops
the clock when the command exits, so `cp` is a memory copy.

Before each command the bench also touches about twice the input's size of memory in a child
process that then exits (`--no-prime` skips this). On a VM whose free memory goes back to the host
(virtio-balloon free page reporting, as on the machine this was written on), the first touch of a
page that sat free is a fault on the host: a `cp -r` of 2 GB took 3.4 s (3.2 s of it system time)
after a command that left little recently freed memory, and 1.0-1.2 s after one that freed 4 GB.
Priming puts every command in the state of a long conversion, which reuses the page cache's own
pages, instead of one that depends on what ran before it.

The naive reference processes the way the seed code (vllm-ascend's process_weights_after_loading)
does, on the CPU: it loads each MoE layer whole, stacks the experts, transposes, builds fp32
temporaries for the bias, encodes scales through numpy round trips, packs int4 with a numpy
emulation of npu_quantize, and saves each layer with safetensors.save_file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import bench_inputs
from bench_inputs import HIDDEN, INTER, ensure_checkpoint, write_header_only_deepseek

from w4a8conv.formats.families import FAMILY_NAMES
from w4a8conv.formats.sources import SOURCE_NAMES, get_source

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / ".venv/bin/w4a8conv")
LAYOUTS = SOURCE_NAMES  # every registered source layout
# The target that serves every layout, so that each is timed through the same processing (for 1.0.0
# per-channel MoE the current line's output is the same bytes).
TARGET = ("--target", "vllm-ascend-0.23")


def evict(path: Path) -> None:
    """Drop a directory's file pages from the page cache, so the next command reads them from the disk."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def priming_bytes(input_bytes: int, prime: bool) -> int:
    """Memory to prime before a command on ``input_bytes`` of input: about twice its size (see the top)."""
    return 2 * input_bytes + (1 << 30) if prime else 0


def prime_memory(nbytes: int) -> None:
    """Leave ``nbytes`` of recently used free memory: a child touches that much and exits (see the top)."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    nbytes = min(nbytes, int(available * 0.8))
    subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({nbytes}, numpy.uint8)"], check=True)


class Run(NamedTuple):
    """One timed command: seconds to exit, seconds until its output is on disk (``None`` unless the
    input was cold), peak RSS in bytes, and user + system CPU seconds."""

    exit_s: float
    synced_s: float | None
    peak_rss: int
    cpu_s: float


def timed(cmd: list[str], cold_input: Path | None = None, prime_bytes: int = 0, last_check: str = "") -> Run:
    """Run ``cmd`` once and time it.

    Runs after a sync so dirty pages don't carry over; with ``cold_input``, that directory is
    evicted from the page cache first and a sync after the command is timed too. ``prime_bytes``
    of memory are primed before the clock starts. A command that fails with ``last_check`` in its
    error line failed the check it runs last, having done all the work timed.
    """
    os.sync()
    if cold_input is not None:
        evict(cold_input)
    if prime_bytes:
        prime_memory(prime_bytes)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    synced = None
    if cold_input is not None:
        os.sync()
        synced = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0 and not (last_check and last_check in stderr):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr}")
    return Run(seconds, synced, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def summarize(runs: list[Run], size: int) -> dict:
    """Medians of :func:`timed` runs; ``seconds``: until the output is on disk (--cache disk) or the exit."""
    all_seconds = [run.synced_s if run.synced_s is not None else run.exit_s for run in runs]
    seconds = statistics.median(all_seconds)
    return {
        "seconds": round(seconds, 3),
        "all_seconds": [round(v, 3) for v in all_seconds],
        "exit_seconds": round(statistics.median(run.exit_s for run in runs), 3),
        "gb_per_s": round(size / seconds / 1e9, 3),
        "peak_rss_mb": round(statistics.median(run.peak_rss for run in runs) / 1e6, 1),
        "cpu_seconds": round(statistics.median(run.cpu_s for run in runs), 2),
    }


def bench_verify(src: Path, out: Path, repeats: int, cache: str, prime: bool, numeric: bool = False) -> dict:
    """Time `w4a8conv verify` (``--numeric`` too with ``numeric``) of a conversion of ``src``; with --cache
    disk both directories come from the disk."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([CLI, "convert", "--in", str(src), "--out", str(out), *TARGET], check=True, capture_output=True)
    size = dir_bytes(src)
    disk = cache == "disk"
    runs = []
    for _ in range(repeats):
        if disk:
            evict(out)
        command = [CLI, "verify", str(src), str(out), *(["--numeric"] if numeric else [])]
        runs.append(timed(command, src if disk else None, priming_bytes(size, prime)))
    shutil.rmtree(out)
    return summarize(runs, size)


def bench_synthetic(data: Path, size_gb: float, repeats: int) -> dict:
    """`w4a8conv synthetic --size-gb` (DeepSeek-shaped, per-channel) against `dd` writing as many bytes,
    each timed until its bytes are on disk (fsync / sync), medians of ``repeats``."""
    target = data / "synthetic-bench"
    written, runs, dd_runs, peaks = 0, [], [], []
    for _ in range(repeats):
        shutil.rmtree(target, ignore_errors=True)
        command = [CLI, "synthetic", str(target), "--size-gb", str(size_gb), "--layout", "v1.0.0-per-channel", "-q"]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(command)}")
        os.sync()
        runs.append(time.perf_counter() - started)
        peaks.append(usage.ru_maxrss * 1024)
        written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        shutil.rmtree(target)
        blocks = max(1, written >> 24)
        os.sync()
        started = time.perf_counter()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}.dd", "bs=16M", f"count={blocks}", "conv=fsync", "status=none"],
            check=True,
        )
        dd_runs.append(time.perf_counter() - started)
        Path(f"{target}.dd").unlink()
    synthetic_s, dd_s = statistics.median(runs), statistics.median(dd_runs)
    return {
        "bytes": written,
        "synthetic_seconds": round(synthetic_s, 2),
        "synthetic_gb_per_s": round(written / synthetic_s / 1e9, 3),
        "dd_seconds": round(dd_s, 2),
        "dd_gb_per_s": round((max(1, written >> 24) << 24) / dd_s / 1e9, 3),
        "fraction_of_dd": round((written / synthetic_s) / ((max(1, written >> 24) << 24) / dd_s), 2),
        "synthetic_peak_rss_mb": round(statistics.median(peaks) / 1e6, 1),
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def int4_weight_bytes(src: Path) -> int:
    """Bytes of the experts' int4 weights in ``src``: what a conversion repacks (the rest is copied)."""
    from w4a8conv.experts import parse_expert
    from w4a8conv.safetensors_io import read_header

    return sum(
        info.nbytes
        for shard in src.glob("*.safetensors")
        for name, info in read_header(shard).tensors.items()
        if name.endswith(".weight") and parse_expert(name.removesuffix(".weight"))
    )


def cpu_floor(layout: str, result: dict, costs: dict) -> float:
    """CPU seconds no conversion of this checkpoint avoids here (see :func:`bench_costs`): a lower bound."""
    repack = costs["repack_v1_gb_per_s" if get_source(layout).packed_on_disk else "repack_mindie_gb_per_s"]
    return round(
        costs["import_torch_cpu_s"]
        + result["output_bytes"] / 1e9 / costs["sha256_gb_per_s"]
        + result["int4_weight_bytes"] / 1e9 / repack,
        2,
    )


def bench_layout(
    src: Path,
    out: Path,
    repeats: int,
    workers: int | None,
    naive: bool,
    cache: str,
    prime: bool = True,
    no_checksums: bool = False,
) -> dict:
    convert = [CLI, "convert", "--in", str(src), "--out", str(out), *TARGET]
    convert += ["--workers", str(workers)] if workers else []
    commands = {"copy": ["cp", "-r", str(src), str(out)], "convert": convert}
    if no_checksums:
        commands["no_checksums"] = [*convert, "--no-checksums"]
    if naive and (src / "quant_model_description.json").is_file():  # the seed reads msModelSlim output only
        commands["naive"] = [sys.executable, bench_inputs.__file__, "--naive", str(src), str(out)]
    runs: dict[str, list[Run]] = {k: [] for k in commands}
    cold_input = src if cache == "disk" else None
    size = dir_bytes(src)
    for _ in range(repeats):
        for name, cmd in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(timed(cmd, cold_input, priming_bytes(size, prime)))
            if name == "convert":
                output_bytes = dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
    result: dict = {
        "input_bytes": size,
        "output_bytes": output_bytes,
        "int4_weight_bytes": int4_weight_bytes(src),
        "repeats": repeats,
        "cache": cache,
        "primed": prime,
    }
    for name, values in runs.items():
        result[name] = summarize(values, size)
    result["convert_over_copy"] = round(result["convert"]["seconds"] / result["copy"]["seconds"], 2)
    result["convert_over_copy_exit"] = round(result["convert"]["seconds"] / result["copy"]["exit_seconds"], 2)
    if no_checksums:
        result["no_checksums_over_copy"] = round(result["no_checksums"]["seconds"] / result["copy"]["seconds"], 2)
    if "naive" in result:
        result["naive_over_convert"] = round(result["naive"]["seconds"] / result["convert"]["seconds"], 2)
    return result


def bench_planning(data: Path, repeats: int) -> dict:
    src = write_header_only_deepseek(data / "deepseek-r1-headers-only")
    commands = {
        "inspect": [CLI, "inspect", str(src), "--json", *TARGET],
        "dry_run": [CLI, "convert", "--in", str(src), "--out", str(data / "never"), "--dry-run", *TARGET],
    }
    result = {}
    for name, cmd in commands.items():
        # The dry run checks --out's free space last: a 695 GB output fits on no bench machine.
        runs = [timed(cmd, last_check="GB more but the filesystem has") for _ in range(repeats)]
        result[name] = {
            "seconds": round(statistics.median(r.exit_s for r in runs), 2),
            "peak_rss_mb": round(runs[0].peak_rss / 1e6),
        }
    return result


def bench_costs(repeats: int) -> dict:
    """CPU seconds that any conversion on this machine pays, whatever the code around them (one core, medians).

    Measured in a child process: with torch loaded here, every command the bench forks would start
    with (and report as its peak RSS) this process's 600 MB.

    ``import_torch_cpu_s``: importing torch, which the CPU path needs because it runs the same torch
    code as the devices; ``sha256_gb_per_s``: hashing the output for the manifest; the two repack
    rates: the int4 weights from their source bytes to operator words (GB of source per second).
    Summed over a checkpoint's bytes and divided by the cores, they bound the wall time from below.
    """
    command = [sys.executable, __file__, "--costs", str(repeats)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def measure_costs(repeats: int) -> dict:
    """:func:`bench_costs`, in this process."""
    import hashlib

    import numpy as np
    import torch

    from w4a8conv.formats.packing import int4_pair_rows_to_int32_words, pack_int4_to_int32

    code = "import time; t = time.process_time(); import torch; print(time.process_time() - t)"
    imports = [
        float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        for _ in range(repeats)
    ]
    torch.set_num_threads(1)

    def rate(work, arrays, rounds: int) -> float:
        # Wall time of one busy thread: process_time() moves in scheduler ticks, too coarse for a 7 MB step.
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(rounds):
                for array in arrays:
                    work(array)
            seconds.append(time.perf_counter() - started)
        return round(rounds * sum(a.nbytes for a in arrays) / statistics.median(seconds) / 1e9, 2)

    rng = np.random.default_rng(0)
    # one expert's gate (down is its transpose) as msModelSlim 1.0.0 bytes and as mindie values
    v1 = [
        torch.from_numpy(rng.integers(-128, 128, shape, dtype=np.int8))
        for shape in ((INTER // 2, HIDDEN), (HIDDEN // 2, INTER))
    ]
    mindie = [
        torch.from_numpy(rng.integers(-8, 8, shape, dtype=np.int8)) for shape in ((INTER, HIDDEN), (HIDDEN, INTER))
    ]
    data = np.ones(256 << 20, dtype=np.uint8)
    return {
        "import_torch_cpu_s": round(statistics.median(imports), 2),
        "sha256_gb_per_s": rate(lambda a: hashlib.sha256(a).digest(), [data], 2),
        "repack_v1_gb_per_s": rate(int4_pair_rows_to_int32_words, v1, 20),
        "repack_mindie_gb_per_s": rate(pack_int4_to_int32, mindie, 10),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--costs":
        print(json.dumps(measure_costs(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size per layout (default 2)")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=LAYOUTS, help="none: families only")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; medians are reported")
    parser.add_argument("--workers", type=int, default=None, help="convert --workers (default: the CLI's)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    parser.add_argument("--verify", action="store_true", help="also time `w4a8conv verify` of a conversion")
    parser.add_argument(
        "--no-checksums", action="store_true", help="also time `convert --no-checksums` (no sha256 manifest)"
    )
    parser.add_argument("--flat", action="store_true", help="also convert a 4x larger mindie checkpoint (memory)")
    parser.add_argument(
        "--cache",
        choices=("disk", "memory"),
        default="disk",
        help="disk: input read from disk, timed until the output is on disk (default); memory: page cache",
    )
    parser.add_argument(
        "--no-prime", action="store_true", help="don't prime free memory before each command (see the top)"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where checkpoints are cached")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--planning", action="store_true", help="also time inspect / --dry-run on a header-only DeepSeek-R1"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="also time `w4a8conv synthetic --size-gb` against dd (same bytes)"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=[],
        choices=FAMILY_NAMES,
        help="also convert each family's per-channel checkpoint of --size-gb, in its names and public shapes",
    )
    args = parser.parse_args()

    args.data.mkdir(parents=True, exist_ok=True)
    out = args.data / "out"
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "cache": args.cache,
        "primed": not args.no_prime,
        "layouts": {},
        "cpu_costs": bench_costs(args.repeats),
    }
    for layout in args.layouts:
        src = ensure_checkpoint(args.data, layout, args.size_gb)
        result = bench_layout(
            src, out, args.repeats, args.workers, not args.no_naive, args.cache, not args.no_prime, args.no_checksums
        )
        result["cpu_floor_s"] = cpu_floor(layout, result, results["cpu_costs"])
        # the floor spread over every core, against the copy: no conversion here can beat this ratio
        result["floor_over_copy"] = round(result["cpu_floor_s"] / os.cpu_count() / result["copy"]["seconds"], 2)
        results["layouts"][layout] = result
        if args.verify:
            verify = bench_verify(src, out, args.repeats, args.cache, not args.no_prime)
            results["layouts"][layout]["verify"] = verify
            numeric = bench_verify(src, out, args.repeats, args.cache, not args.no_prime, numeric=True)
            results["layouts"][layout]["verify_numeric"] = numeric
    if args.families:
        results["families"] = {}
    for family in args.families:
        src = bench_inputs.ensure_family_checkpoint(args.data, family, args.size_gb)
        result = bench_layout(src, out, args.repeats, args.workers, False, args.cache, not args.no_prime)
        results["families"][family] = result
    if args.flat:
        small = ensure_checkpoint(args.data, "mindie", args.size_gb)
        large = ensure_checkpoint(args.data, "mindie", args.size_gb * 4)
        rss = {}
        for label, src in (("1x", small), ("4x", large)):
            rss[label] = bench_layout(src, out, 1, args.workers, False, args.cache, not args.no_prime)
        results["flat"] = {
            label: {"input_bytes": r["input_bytes"], "peak_rss_mb": r["convert"]["peak_rss_mb"]}
            for label, r in rss.items()
        }
        results["flat"]["growth"] = round(rss["4x"]["convert"]["peak_rss_mb"] / rss["1x"]["convert"]["peak_rss_mb"], 3)
    if args.planning:
        results["planning"] = bench_planning(args.data, args.repeats)
    if args.synthetic:
        results["synthetic"] = bench_synthetic(args.data, args.size_gb, args.repeats)
    (args.data / "results.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    disk = results["cache"] == "disk"
    title = "input from disk, timed until the output is on disk" if disk else "input in the page cache"
    title += ", memory primed" if results["primed"] else ""
    table = Table(title=f"w4a8conv bench: {title} (medians)")
    columns = ["layout", "input", "command", "seconds", "GB/s", "CPU s", "peak RSS MB", "ratio"]
    if disk:
        columns.insert(4, "exit s")
    for col in columns:
        table.add_column(col)
    for layout, r in results["layouts"].items():
        for name in ("copy", "convert", "no_checksums", "naive", "verify", "verify_numeric"):
            if name not in r:
                continue
            convert_ratio = f"{r['convert_over_copy']}x copy"
            if disk:
                convert_ratio += f" ({r['convert_over_copy_exit']}x at cp's exit)"
            ratio = {
                "convert": convert_ratio,
                "no_checksums": f"{r.get('no_checksums_over_copy')}x copy",
                "naive": f"{r.get('naive_over_convert')}x convert",
                "verify": f"{r['verify']['seconds'] / r['convert']['seconds']:.2f}x convert" if "verify" in r else "",
            }
            row = [
                layout,
                f"{r['input_bytes'] / 1e9:.2f} GB",
                {"no_checksums": "convert --no-checksums", "verify_numeric": "verify --numeric"}.get(name, name),
                f"{r[name]['seconds']:.2f}",
                f"{r[name]['gb_per_s']:.2f}",
                f"{r[name]['cpu_seconds']:.2f}",
                f"{r[name]['peak_rss_mb']:.0f}",
                ratio.get(name, ""),
            ]
            if disk:
                row.insert(4, f"{r[name]['exit_seconds']:.2f}")
            table.add_row(*row)
    Console(width=max(Console().width, 130)).print(table)
    c = results["cpu_costs"]
    cpus = results["machine"]["cpus"]
    Console().print(
        f"CPU every conversion pays here (one core): import torch {c['import_torch_cpu_s']} s, sha256 "
        f"{c['sha256_gb_per_s']} GB/s, int4 repack {c['repack_v1_gb_per_s']} GB/s (1.0.0) / "
        f"{c['repack_mindie_gb_per_s']} GB/s (mindie)"
    )
    for layout, r in results["layouts"].items():
        Console().print(
            f"  {layout}: at least {r['cpu_floor_s']} CPU s, {r['cpu_floor_s'] / cpus:.2f} s on {cpus} cores "
            f"= {r['floor_over_copy']}x copy; convert used {r['convert']['cpu_seconds']} CPU s"
        )
    for family, r in results.get("families", {}).items():
        Console().print(
            f"{family} (per-channel, its names and shapes): {r['input_bytes'] / 1e9:.2f} GB, convert "
            f"{r['convert']['seconds']:.2f} s = {r['convert_over_copy']}x copy ({r['copy']['seconds']:.2f} s), "
            f"{r['convert']['cpu_seconds']:.2f} CPU s, peak RSS {r['convert']['peak_rss_mb']:.0f} MB"
        )
    if "planning" in results:
        p = results["planning"]
        Console().print(
            f"header-only DeepSeek-R1 (223k tensors): inspect {p['inspect']['seconds']} s "
            f"({p['inspect']['peak_rss_mb']} MB), convert --dry-run {p['dry_run']['seconds']} s "
            f"({p['dry_run']['peak_rss_mb']} MB)"
        )
    if "synthetic" in results:
        y = results["synthetic"]
        Console().print(
            f"synthetic: {y['bytes'] / 1e9:.2f} GB in {y['synthetic_seconds']} s ({y['synthetic_gb_per_s']} GB/s); "
            f"dd: {y['dd_seconds']} s ({y['dd_gb_per_s']} GB/s); {y['fraction_of_dd']} of dd's rate; "
            f"synthetic's peak RSS {y['synthetic_peak_rss_mb']} MB"
        )
    if "flat" in results:
        f = results["flat"]
        Console().print(
            f"peak RSS: {f['1x']['peak_rss_mb']:.0f} MB at {f['1x']['input_bytes'] / 1e9:.1f} GB, "
            f"{f['4x']['peak_rss_mb']:.0f} MB at {f['4x']['input_bytes'] / 1e9:.1f} GB (x{f['growth']})"
        )


if __name__ == "__main__":
    main()
