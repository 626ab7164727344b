"""The ``w4a8conv`` command line. Exit codes: 0 ok, 1 failure, 2 bad input."""

import os

# numpy's OpenBLAS starts a thread per core that spins while idle (docs/performance.md, "Measurements
# behind the code"); nothing here calls BLAS. Set before numpy is first imported: the source registry
# imported below brings it in.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import ctypes
import functools
import inspect as _inspect  # the `inspect` command below takes the plain name
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, Terminated, exit_status
from .output import Output, human_bytes
from .sources import SOURCE_NAMES, SOURCES
from .targets import DEFAULT_TARGET, TARGET_NAMES, TARGETS

app = typer.Typer(
    name="w4a8conv",
    help="Convert msModelSlim W4A8_DYNAMIC checkpoints offline into the layout Ascend operators consume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# I/O waits overlap better with more threads than cores (docs/performance.md, "Threads or processes").
DEFAULT_WORKERS = max(4, min(8, os.cpu_count() or 1))
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
TargetOpt = Annotated[
    str,
    typer.Option(
        help="The serving engine release the output is for: "
        + "; ".join(f"{name}: {TARGETS[name].summary}" for name in TARGET_NAMES)
        + f". Default: {DEFAULT_TARGET}, the newest."
    ),
]
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint directory.", show_default=False)]


def share_one_malloc_arena() -> None:
    """Have glibc serve every thread from one malloc arena, before `verify` starts its threads.

    Per-thread arenas hand freed memory back to the kernel and fault it in again on the next module
    (docs/performance.md, "Measurements behind the code"). A no-op where the C library has no ``mallopt``.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def handle_errors(command):
    """Turn known errors into one line and an exit code; unknown ones too, unless W4A8CONV_DEBUG is set."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        output = Output(json_mode=bool(kwargs.get("json_output")))
        try:
            return command(*args, output=output, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt, Terminated) as e:
            status = exit_status(e)
            if status is None and os.environ.get("W4A8CONV_DEBUG"):
                raise
            message, code = status or (
                f"internal error: {type(e).__name__}: {e} (set W4A8CONV_DEBUG=1 for a traceback)",
                EXIT_FAILURE,
            )
            output.error(message)
            raise typer.Exit(code) from None

    # Typer reads the signature: hide the injected ``output`` parameter from it.
    sig = _inspect.signature(command)
    wrapper.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "output"])
    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"w4a8conv {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Inspect and convert msModelSlim W4A8_DYNAMIC checkpoints."""


@app.command()
@handle_errors
def inspect(
    path: CheckpointArg, target: TargetOpt = DEFAULT_TARGET, json_output: JsonOpt = False, *, output: Output
) -> None:
    """Report a checkpoint's layout, group size, modules, shards and every inconsistency (headers only).

    Exits 2 when problems are found.
    """
    from .inspect import inspect_checkpoint

    report = inspect_checkpoint(path, target)
    if output.json_mode:
        output.emit_json(report.as_dict())
    else:
        output.inspect_table(report)
    if report.problems:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
@handle_errors
def convert(
    src: Annotated[Path, typer.Option("--in", help="Input checkpoint directory (never modified).", show_default=False)],
    dst: Annotated[
        Path, typer.Option("--out", help="Output directory (must not exist or be empty).", show_default=False)
    ],
    device: Annotated[str, typer.Option(help="Where to run the processing: auto, cpu, cuda or npu.")] = "cpu",
    target: TargetOpt = DEFAULT_TARGET,
    workers: Annotated[
        int, typer.Option(help="Threads converting modules in parallel; the output is identical for any number.")
    ] = DEFAULT_WORKERS,
    num_workers: Annotated[
        int, typer.Option(help="Jobs sharing this conversion (a job array's size); then run `finalize`.")
    ] = 1,
    worker_index: Annotated[int, typer.Option(help="This job's index in the array, 0-based.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous w4a8conv output in --out.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted conversion into --out, redoing only unfinished shards.")
    ] = False,
    verify: Annotated[bool, typer.Option(help="Run `w4a8conv verify` on the result (exit 1 if it fails).")] = False,
    direct_io: Annotated[
        bool | None,
        typer.Option(
            "--direct-io/--no-direct-io",
            help="Read W4A8 weights and write large tensors with O_DIRECT, bypassing the page cache (same "
            "bytes either way). Default: on where the input (for reads) or the output (for writes) is on a "
            "local filesystem (ext4, xfs, btrfs, f2fs, tmpfs...), off elsewhere: direct I/O on network and "
            "FUSE filesystems was not measured.",
            show_default=False,
        ),
    ] = None,
    checksums: Annotated[
        bool,
        typer.Option(
            help="Hash every output file while writing it and list the sha256 sums in w4a8conv.sha256 "
            "(about 0.5 CPU-seconds per GB). Every job of an array must pass the same.",
        ),
    ] = True,
    dry_run: Annotated[bool, typer.Option(help="Read headers and plan only: report, check, write nothing.")] = False,
    json_output: JsonOpt = False,
    *,
    output: Output,
) -> None:
    """Convert a W4A8_DYNAMIC checkpoint into processed shards a serving engine loads directly."""
    from .convert import convert_checkpoint, plan_conversion

    if dry_run:
        plan = plan_conversion(src, dst, target, num_workers, worker_index, checksums)
        summary = plan.summary
        mine = {name: plan.shard(name).file_size for name in plan.shares[worker_index]}
        if output.json_mode:
            report = {**summary.as_dict(), "target": plan.target, "total_shards": summary.shards, "shards": mine}
            output.emit_json({"ok": True, "dry_run": True, **report})
        else:
            output.info(
                f"would convert a {summary.format} checkpoint (group size {summary.group_size}) for {plan.target}: "
                f"{summary.modules} W4A8 modules into {len(mine)} of {summary.shards} shards, "
                f"{human_bytes(summary.input_bytes)} -> {human_bytes(summary.output_bytes)}; nothing written"
            )
        return
    result = convert_checkpoint(
        src,
        dst,
        device=device,
        target=target,
        workers=workers,
        num_workers=num_workers,
        worker_index=worker_index,
        overwrite=overwrite,
        resume=resume,
        direct_io=direct_io,
        checksums=checksums,
        progress=output.progress(),
    )
    verification = None
    if verify and num_workers == 1:
        from .verify import verify_conversion

        share_one_malloc_arena()
        verification = verify_conversion(src, dst)
    if output.json_mode:
        ok = verification is None or verification.ok
        output.emit_json({"ok": ok, **result.as_dict(), **({"verify": verification.as_dict()} if verification else {})})
        if not ok:
            raise typer.Exit(EXIT_FAILURE)
        return
    if verification is not None:
        output.verify_report(verification)
        if not verification.ok:
            raise typer.Exit(EXIT_FAILURE)
    if num_workers > 1:
        output.info(
            f"share {worker_index} of {num_workers} done in {result.seconds:.1f}s; "
            f"run `w4a8conv finalize {dst}` once every share is done"
        )
        return
    summary = result.summary
    output.info(
        f"converted {summary.format} checkpoint (group size {summary.group_size}) for {result.target}: "
        f"{summary.modules} W4A8 modules, {summary.moe_layers} MoE layers / {summary.experts} experts, "
        f"{summary.shards} shards, {human_bytes(summary.input_bytes)} -> {human_bytes(summary.output_bytes)} "
        f"in {result.seconds:.1f}s on {result.device}\n-> {result.out_dir}"
    )


@app.command()
@handle_errors
def verify(
    src: Annotated[Path, typer.Argument(help="The input checkpoint.", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Its conversion, to check.", show_default=False)],
    sample: Annotated[
        float, typer.Option(help="Fraction of W4A8 modules to check (1.0: all); the rest is always checked.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed choosing the sampled modules and random activations.")] = 0,
    numeric: Annotated[
        bool, typer.Option(help="Also run the CPU reference of the W4A8 operators on random int8 activations.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Threads checking in parallel, about 100 MB each (default: the cores, at most 4); "
            "the report is the same for any number.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
    *,
    output: Output,
) -> None:
    """Prove DST is a correct conversion of SRC, independently of the code that wrote it (exit 1 if not)."""
    from .verify import verify_conversion

    share_one_malloc_arena()
    progress = output.progress()
    try:
        report = verify_conversion(
            src, dst, sample=sample, seed=seed, numeric=numeric, progress=progress, workers=workers
        )
    finally:
        progress.finish()
    if output.json_mode:
        output.emit_json(report.as_dict())
    else:
        output.verify_report(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command()
@handle_errors
def finalize(
    dst: Annotated[Path, typer.Argument(help="The output directory the jobs of an array wrote.", show_default=False)],
    json_output: JsonOpt = False,
    *,
    output: Output,
) -> None:
    """Write the index and description once every share of a job array is done (exit 1, naming the missing)."""
    from .convert import finalize as finalize_job

    summary = finalize_job(dst).summary
    if output.json_mode:
        output.emit_json({"ok": True, "out_dir": str(dst), **summary.as_dict()})
    else:
        output.info(f"finalized {dst}: {summary.shards} shards, {summary.modules} W4A8 modules")


@app.command()
@handle_errors
def synthetic(
    path: Annotated[Path, typer.Argument(help="Directory to write (must not exist or be empty).", show_default=False)],
    layout: Annotated[
        str, typer.Option(help="The source layout: " + "; ".join(f"{n}: {SOURCES[n].summary}" for n in SOURCE_NAMES))
    ] = SOURCE_NAMES[0],
    seed: Annotated[int, typer.Option(help="Seed of the random int4 values and scales.")] = 0,
    json_output: JsonOpt = False,
    *,
    output: Output,
) -> None:
    """Write a tiny synthetic DeepSeek-like W4A8_DYNAMIC checkpoint (for demos and tests)."""
    from .errors import BadInputError
    from .synthetic import SyntheticSpec, write_checkpoint

    if layout not in SOURCE_NAMES:
        raise BadInputError(f"--layout {layout}: choose one of {', '.join(SOURCE_NAMES)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"{path}: exists and is not an empty directory")
    write_checkpoint(path, layout, SyntheticSpec(seed=seed))
    if output.json_mode:
        output.emit_json({"ok": True, "path": str(path), "layout": layout})
    else:
        output.info(f"wrote a synthetic {layout} checkpoint to {path}")


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)  # a clean stop, as for Ctrl-C: one line, the work so far kept
    try:
        app()
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    if "torch" not in sys.modules:
        sys.exit(code)
    # Unloading torch (its modules, then its libraries' C++ destructors) takes a noticeable part of a
    # small conversion (docs/performance.md). By now every output file is fsynced and closed, and the
    # output is flushed here: nothing is left for that teardown to do, so the process ends without it.
    if not isinstance(code, int) and code is not None:
        print(code, file=sys.stderr)
        code = EXIT_FAILURE
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe: nobody is reading any more
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
