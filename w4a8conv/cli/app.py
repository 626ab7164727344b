"""The ``w4a8conv`` command line. Exit codes: 0 ok, 1 failure, 2 bad input."""

import os
import signal
import sys


def _stopped_while_starting(signum, frame) -> None:
    """Ctrl-C (or SIGTERM) while the modules below are still importing: one line, nothing was written."""
    sys.stderr.write(f"error: interrupted by {signal.Signals(signum).name} while starting; nothing was written\n")
    os._exit(128 + signum)


# Only when this process is the command (not a test or a library importing the module); main() puts
# the handlers the conversion relies on in place.
_COMMAND = os.path.basename(sys.argv[0]) == "w4a8conv" or sys.argv[0].endswith(
    (os.path.join("w4a8conv", "__main__.py"), os.path.join("w4a8conv", "cli", "__main__.py"))
)
if _COMMAND:
    signal.signal(signal.SIGINT, _stopped_while_starting)
    signal.signal(signal.SIGTERM, _stopped_while_starting)

# numpy's OpenBLAS starts a thread per core that spins while idle (docs/performance.md, "Measurements
# behind the code"); nothing here calls BLAS. Set before numpy is first imported: the source registry
# imported below brings it in.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import ctypes
import functools
import inspect as _inspect  # the `inspect` command below takes the plain name
import math
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..converting.devices import DEVICE_CHOICES
from ..errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, Terminated, exit_status, interruption
from ..formats.families import FAMILIES, FAMILY_NAMES
from ..formats.sources import CURRENT_MSMODELSLIM_LAYOUT, SOURCE_NAMES, SOURCES
from ..formats.targets import DEFAULT_TARGET, TARGET_NAMES, TARGETS
from .output import Output, group_words, human_bytes, plural

app = typer.Typer(
    name="w4a8conv",
    help="Convert msModelSlim W4A8_DYNAMIC checkpoints offline into the layout Ascend operators consume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: complete at any width and in pipes (Rich cut words to fit its columns and read [..] as markup).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def choices(values: tuple[str, ...]) -> str:
    """An option's choices as its help shows them. The value is checked by the registry it names
    (one line, exit 2), so that a target or layout registered by a plug-in is accepted too."""
    return "[" + "|".join(values) + "]"


# I/O waits overlap better with more threads than cores (docs/performance.md, "Threads or processes").
DEFAULT_WORKERS = max(4, min(8, os.cpu_count() or 1))
JsonOpt = Annotated[
    bool, typer.Option("--json", help='Print one JSON object on stdout (always with an "ok" key) instead of text.')
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress and no result text: only errors, the exit code and --json.")
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        metavar=choices(TARGET_NAMES),
        help="The serving engine release the output is for: "
        + "; ".join(f"{name}: {TARGETS[name].summary}" for name in TARGET_NAMES)
        + f". Default: {DEFAULT_TARGET} (the newest), or with --resume and in a job array what the conversion "
        "was started with. docs/converting.md#the-target says which to pass for the vllm-ascend you serve with.",
        show_default=False,
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
        output = Output(json_mode=bool(kwargs.get("json_output")), quiet=bool(kwargs.get("quiet")))
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
        bool, typer.Option("--version", "-V", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Inspect and convert msModelSlim W4A8_DYNAMIC checkpoints."""


@app.command(short_help="What a checkpoint is, who serves it, what is wrong (headers only).")
@handle_errors
def inspect(
    path: CheckpointArg,
    target: Annotated[
        str | None,
        typer.Option(
            metavar=choices(TARGET_NAMES),
            help="Check a source against this serving target, or an output was made for it. Default: the "
            "newest target that serves the source (exit 2 only when none does).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Report what a checkpoint is, which targets serve it, and every inconsistency (headers only).

    Exits 2 for a broken checkpoint, or one the given --target cannot serve.
    """
    from ..planning.inspect import inspect_checkpoint

    report = inspect_checkpoint(path, target)
    if output.json_mode:
        output.emit_json(report.as_dict())
    elif not output.quiet:
        output.inspect_table(report)
    if report.problems:
        raise typer.Exit(EXIT_BAD_INPUT)


# The job-array index a scheduler gives each job: Slurm's (from --array's first index), Kubernetes'.
_ARRAY_INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


def array_share(array_size: int | None, array_index: int | None) -> tuple[int, int]:
    """``(size, index)`` of this job's share: 1, 0 without an array. The index comes from the option,
    else from the scheduler's environment; a size without an index, or an index without a size, is refused.

    Slurm's index counts from the array's first index (``--array=1-4``); a rerun of one task the usual
    way (``sbatch --array=2``) is an array of one, whose first index is 2: where the scheduler's task
    count differs from ``--array-size`` the index is refused rather than taken as share 0."""
    from ..errors import BadInputError

    if array_size is None:
        if array_index is not None:
            raise BadInputError(f"--array-index {array_index} without --array-size: give the array's size too")
        return 1, 0
    if array_size < 1:
        raise BadInputError(f"--array-size {array_size}: must be positive (the number of jobs in the array)")
    if array_index is not None:
        return array_size, array_index
    variable = next((v for v in _ARRAY_INDEX_VARIABLES if os.environ.get(v, "").strip()), None)
    if variable is None:
        raise BadInputError(
            f"--array-size {array_size} without --array-index, and neither SLURM_ARRAY_TASK_ID nor "
            "JOB_COMPLETION_INDEX is set: which share is this job's?"
        )
    first, count = 0, None
    try:
        if variable == "SLURM_ARRAY_TASK_ID":
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"]) if os.environ.get("SLURM_ARRAY_TASK_COUNT") else None
        array_index = int(os.environ[variable]) - first
    except ValueError:
        raise BadInputError(f"{variable}={os.environ[variable]!r}: not a job-array index") from None
    if count is not None and count != array_size:
        task = os.environ[variable]
        raise BadInputError(
            f"SLURM_ARRAY_TASK_COUNT={count} but --array-size {array_size}: the index of task {task} cannot be "
            f"told from an array of another size (a rerun of one task with sbatch --array={task}?); pass "
            f"--array-index (the task's index in the original array, counted from 0), or requeue the task "
            f"(scontrol requeue JOBID_{task})"
        )
    if not 0 <= array_index < array_size:
        shown = f"{variable}={os.environ[variable]}" + (f" less SLURM_ARRAY_TASK_MIN={first}" if first else "")
        raise BadInputError(
            f"{shown} gives index {array_index}, outside --array-size {array_size} (0 to {array_size - 1}); "
            "submit the array with as many tasks as --array-size, or pass --array-index"
        )
    return array_size, array_index


def _warn_empty_shares(output: Output, size: int, shards: int, empty: tuple[int, ...]) -> None:
    if empty:
        jobs = ", ".join(map(str, empty))
        output.warning(
            f"--array-size {size} but the output has {plural(shards, 'shard')}: "
            f"job{'s' if len(empty) != 1 else ''} {jobs} {'have' if len(empty) != 1 else 'has'} nothing to convert"
        )


def _refuse_renamed(old: str, new: str, value: object) -> None:
    from ..errors import BadInputError

    if value is not None:
        raise BadInputError(
            f"{old} is now {new}: it splits the conversion into the jobs of an array, each writing "
            "only its share (then `w4a8conv finalize`); threads inside one job are --workers"
        )


@app.command(short_help="Convert a checkpoint into processed shards an engine loads as they are.")
@handle_errors
def convert(
    src: Annotated[Path, typer.Option("--in", help="Input checkpoint directory (never modified).", show_default=False)],
    dst: Annotated[
        Path, typer.Option("--out", help="Output directory (must not exist or be empty).", show_default=False)
    ],
    device: Annotated[str, typer.Option(metavar=choices(DEVICE_CHOICES), help="Where to run the processing.")] = "cpu",
    target: TargetOpt = None,
    workers: Annotated[
        int, typer.Option(help="Threads converting modules in parallel; the output is identical for any number.")
    ] = DEFAULT_WORKERS,
    array_size: Annotated[
        int | None,
        typer.Option(
            help="This job is one of a job array of this many, each converting a disjoint share of the shards; "
            "run `w4a8conv finalize` once all are done.",
            show_default=False,
        ),
    ] = None,
    array_index: Annotated[
        int | None,
        typer.Option(
            help="This job's index in the array, 0-based. Default: from SLURM_ARRAY_TASK_ID (minus "
            "SLURM_ARRAY_TASK_MIN) or JOB_COMPLETION_INDEX.",
            show_default=False,
        ),
    ] = None,
    num_workers: Annotated[int | None, typer.Option(hidden=True)] = None,  # renamed: refused with a hint
    worker_index: Annotated[int | None, typer.Option(hidden=True)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous w4a8conv output in --out.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted conversion into --out, redoing only unfinished shards.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Run `w4a8conv verify` on the result (exit 1 if it fails). In a job array: `finalize --verify`."
        ),
    ] = False,
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
        bool | None,
        typer.Option(
            "--checksums/--no-checksums",
            help="Hash every output file while writing it and list the sha256 sums in w4a8conv.sha256 "
            "(about 0.5 CPU-seconds per GB). Default: on, or with --resume and in a job array what the "
            "conversion was started with.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="Read headers, plan and check both sides (input and --out): report, write nothing."),
    ] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            metavar="[bfloat16|float16|float32]",
            help="The dtype the model serves in (a W4A8 Linear's scales are rounded to it). Default: "
            "config.json's torch_dtype, else bfloat16, with a warning saying so; with --resume and in a job "
            "array what the conversion was started with. One that contradicts config.json needs --force-dtype.",
            show_default=False,
        ),
    ] = None,
    force_dtype: Annotated[
        bool,
        typer.Option(help="Convert for --dtype even where config.json declares another dtype."),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Convert a W4A8_DYNAMIC checkpoint into processed shards a serving engine loads directly."""
    from ..converting.convert import convert_checkpoint, empty_shares, plan_conversion
    from ..errors import BadInputError

    _refuse_renamed("--num-workers", "--array-size", num_workers)
    _refuse_renamed("--worker-index", "--array-index", worker_index)
    size, index = array_share(array_size, array_index)
    if verify and array_size is not None:
        raise BadInputError(
            f"--verify in a job array: each job writes only its share; run `w4a8conv finalize {dst} --verify "
            f"{src}` once every share is done"
        )
    if dry_run:
        plan = plan_conversion(
            src,
            dst,
            target,
            size,
            index,
            checksums,
            overwrite=overwrite,
            resume=resume,
            workers=workers,
            device=device,
            dtype=dtype,
            notice=output.warning,
            force_dtype=force_dtype,
        )
        _warn_empty_shares(output, size, len(plan.shards), empty_shares(plan))
        summary = plan.summary
        mine = list(plan.shares[index])
        if output.json_mode:
            report = {**summary.as_dict(), "target": plan.target, "in_dir": str(src), "out_dir": str(dst)}
            share_bytes = sum(plan.shard(name).file_size for name in mine)
            output.emit_json(
                {"ok": True, "dry_run": True, **report, "share_shards": mine, "share_output_bytes": share_bytes}
            )
        else:
            share = f"{len(mine)} of {plural(summary.shards, 'shard')}" if size > 1 else plural(summary.shards, "shard")
            output.info(
                f"would convert a {summary.format} checkpoint ({group_words(summary.group_size)}) for {plan.target}: "
                f"{plural(summary.modules, 'W4A8 module')} into {share}, "
                f"{human_bytes(summary.input_bytes)} -> {human_bytes(summary.output_bytes)}; nothing written"
            )
        return
    checker = _VerifyBeforePublishing(output, src, dst) if verify else None
    with checker or contextlib.nullcontext():
        result = convert_checkpoint(
            src,
            dst,
            device=device,
            target=target,
            workers=workers,
            array_size=size,
            array_index=index,
            overwrite=overwrite,
            resume=resume,
            direct_io=direct_io,
            checksums=checksums,
            progress=output.progress(),
            verify=checker,
            dtype=dtype,
            notice=output.warning,
            force_dtype=force_dtype,
        )
    # --resume of a finished output publishes nothing: verified as it stands
    verification = (checker.report or _verified(output, src, dst)) if checker else None
    _warn_empty_shares(output, size, result.summary.shards, result.empty_shares)
    _report(output, {**result.as_dict(), "in_dir": str(src)}, verification)
    if size > 1:
        output.info(
            f"share {index} of {size} done in {result.seconds:.1f}s; "
            f"run `w4a8conv finalize {dst}` once every share is done"
        )
        return
    summary = result.summary
    if result.already_complete:
        output.info(f"{result.out_dir} is already a complete conversion of {src}: nothing to do")
        return
    output.info(
        f"converted {summary.format} checkpoint ({group_words(summary.group_size)}) for {result.target}: "
        f"{plural(summary.modules, 'W4A8 module')}, {plural(summary.moe_layers, 'MoE layer')} / "
        f"{plural(summary.experts, 'expert')}, "
        f"{plural(summary.shards, 'shard')}, {human_bytes(summary.input_bytes)} -> {human_bytes(summary.output_bytes)} "
        f"in {result.seconds:.1f}s on {result.device}\n-> {result.out_dir}"
    )


def _verified(output: Output, src: Path, dst: Path, **options):
    """``verify_conversion`` with progress on stderr, labelled as such."""
    from ..verify import verify_conversion

    share_one_malloc_arena()
    progress = output.progress("verifying")
    try:
        return verify_conversion(src, dst, progress=progress, **options)
    finally:
        progress.finish()


class _VerifyBeforePublishing:
    """``finalize``'s check before it publishes the description; its report printed even when it fails."""

    def __init__(self, output: Output, src: Path, dst: Path):
        self.output, self.src, self.dst, self.report = output, src, dst, None

    def __call__(self, unpublished_description: Path):
        self.report = _verified(self.output, self.src, self.dst, unpublished_description=unpublished_description)
        return self.report

    def __enter__(self) -> "_VerifyBeforePublishing":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        from ..converting.jobs import VerificationFailed

        if isinstance(error, VerificationFailed) and not self.output.json_mode and not self.output.quiet:
            self.output.verify_report(error.report)


def _report(output: Output, result: dict, verification) -> None:
    """The JSON result, or the verification's text; exit 1 when the verification failed."""
    ok = verification is None or verification.ok
    if output.json_mode:
        output.emit_json({"ok": ok, **result, **({"verify": verification.as_dict()} if verification else {})})
    elif verification is not None and not output.quiet:
        output.verify_report(verification)
    if not ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command(short_help="Prove an output is a correct conversion of its source.")
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
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Prove DST is a correct conversion of SRC, independently of the code that wrote it (exit 1 if not)."""
    report = _verified(output, src, dst, sample=sample, seed=seed, numeric=numeric, workers=workers)
    if output.json_mode:
        output.emit_json({"ok": report.ok, "in_dir": str(src), "out_dir": str(dst), **report.as_dict()})
    elif not output.quiet:
        output.verify_report(report)
    elif not report.ok:  # as `sha256sum --quiet` still prints its failures: one line on stderr
        count = report.problems_total
        output.error(f"{dst}: verification failed, {plural(count, 'problem')}; first: {report.problems[0]}")
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command("check-engine", short_help="Ask the installed engine, per parallel layout, if it serves an output.")
@handle_errors
def check_engine(
    dst: Annotated[Path, typer.Argument(help="A w4a8conv output (its canary is what is checked).", show_default=False)],
    tp: Annotated[
        int | None,
        typer.Option(
            help="The tensor-parallel size to check (with --expert-parallel: the expert-parallel size). Default: "
            "every layout a user could pick, MoE tp 1, 2, 4, 8 and 16 and expert parallel 16.",
            show_default=False,
        ),
    ] = None,
    expert_parallel: Annotated[bool, typer.Option(help="Expert parallelism over --tp ranks (MoE tp 1).")] = False,
    dynamic_eplb: Annotated[bool, typer.Option(help="With dynamic expert load balancing (per-expert lists).")] = False,
    mega_moe: Annotated[
        bool, typer.Option(help="With MegaMoE (enable_fused_mc2 1, where the release has it).")
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(help="The rank to check. Default: the first and the last of each layout.", show_default=False),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Run the plugin's canary comparison on the installed vLLM and vllm-ascend for each parallel layout,
    without starting an engine: exit 0 when every layout serves, 1 when any is refused."""
    from ..serving.vllm_plugin.check_engine import DEFAULT_LAYOUTS, Layout, serving_device
    from ..serving.vllm_plugin.check_engine import check_engine as run_check

    asked = tp is not None or expert_parallel or dynamic_eplb or mega_moe
    size = tp if tp is not None else (16 if expert_parallel else 1)
    layouts = (Layout(size, expert_parallel, dynamic_eplb, mega_moe),)
    engine, verdicts = run_check(dst, layouts if asked else DEFAULT_LAYOUTS, rank)
    ok = all(v.serves for v in verdicts)
    if output.json_mode:
        records = [v.as_dict() for v in verdicts]
        output.emit_json(
            {"ok": ok, "out_dir": str(dst), "engine": engine, "device": serving_device(), "layouts": records}
        )
    elif not output.quiet:
        for v in verdicts:
            if v.serves:
                output.info(
                    f"serves   {v.layout}, rank {v.rank}: bit-identical ({'; '.join(v.checked)}), {v.seconds} s"
                    + (f" ({v.note})" if v.note else "")
                )
            else:
                output.info(f"refused  {v.layout}, rank {v.rank}: {v.reason}" + (f" ({v.note})" if v.note else ""))
    if not ok:
        refused = sum(not v.serves for v in verdicts)
        if output.quiet and not output.json_mode:
            output.error(f"{dst}: refused at {plural(refused, 'layout')} of {len(verdicts)}")
        raise typer.Exit(EXIT_FAILURE)


@app.command(short_help="Publish a job array's output once every share is done.")
@handle_errors
def finalize(
    dst: Annotated[Path, typer.Argument(help="The output directory the jobs of an array wrote.", show_default=False)],
    verify: Annotated[
        Path | None,
        typer.Option(
            metavar="SRC",
            help="Verify the output against SRC, the input checkpoint, before publishing it: a failed "
            "verification publishes nothing and exits 1.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Write the index and description once every share of a job array is done (exit 1, naming the missing).

    On a directory already finalized it does nothing and exits 0, so a retried CI step passes.
    """
    from ..converting.convert import finalize as finalize_job

    checker = _VerifyBeforePublishing(output, verify, dst) if verify is not None else None
    with checker or contextlib.nullcontext():
        plan = finalize_job(dst, verify=checker)
    # a directory finalized before publishes nothing: verified as it stands
    verification = (checker.report or _verified(output, verify, dst)) if checker else None
    result = {
        "out_dir": str(dst),
        "already_finalized": plan is None,
        **({} if plan is None else plan.summary.as_dict()),
    }
    _report(output, result, verification)
    if plan is None:
        output.info(f"{dst} is already finalized; nothing to do")
    else:
        summary = plan.summary
        output.info(f"finalized {dst}: {plural(summary.shards, 'shard')}, {plural(summary.modules, 'W4A8 module')}")


@app.command(short_help="Write a synthetic W4A8_DYNAMIC checkpoint of a model family.")
@handle_errors
def synthetic(
    path: Annotated[Path, typer.Argument(help="Directory to write (must not exist or be empty).", show_default=False)],
    layout: Annotated[
        str,
        typer.Option(
            metavar=choices(SOURCE_NAMES),
            help="The source layout (default: what msModelSlim writes today, which the default target serves): "
            + "; ".join(f"{n}: {SOURCES[n].summary}" for n in SOURCE_NAMES),
        ),
    ] = CURRENT_MSMODELSLIM_LAYOUT,
    family: Annotated[
        str,
        typer.Option(
            metavar=choices(FAMILY_NAMES),
            help="The model family whose tensor names, recipe and config.json msModelSlim writes: "
            + "; ".join(f"{n}: {FAMILIES[n].label}" for n in FAMILY_NAMES)
            + ". See docs/formats.md.",
        ),
    ] = FAMILY_NAMES[0],
    seed: Annotated[int, typer.Option(help="Seed of the random int4 values and scales.")] = 0,
    hidden: Annotated[
        int | None,
        typer.Option(
            help="hidden_size. Default 128; with --size-gb the family's (DeepSeek-R1: 7168).", show_default=False
        ),
    ] = None,
    intermediate: Annotated[
        int | None,
        typer.Option(
            help="moe_intermediate_size. Default 64; with --size-gb the family's (DeepSeek-R1: 2048).",
            show_default=False,
        ),
    ] = None,
    experts: Annotated[
        int | None,
        typer.Option(
            help="Routed experts per MoE layer. Default 4; with --size-gb scaled to it (16 at 2 GB, up to the "
            "family's: DeepSeek-R1's 256 from 32 GB).",
            show_default=False,
        ),
    ] = None,
    dense_layers: Annotated[
        int | None,
        typer.Option(
            help="Dense decoder layers first. Default 1, 0 for families without any (DeepSeek-V4, Qwen3.5-MoE).",
            show_default=False,
        ),
    ] = None,
    moe_layers: Annotated[
        int | None,
        typer.Option(help="MoE decoder layers after them (DeepSeek-R1: 58). Default 2.", show_default=False),
    ] = None,
    size_gb: Annotated[
        float | None,
        typer.Option(
            help="About this many GB of shards in the family's public shapes (DeepSeek-R1: hidden 7168, "
            "moe_intermediate 2048), group size 256, the experts and MoE layers scaled to the size (at least one "
            "layer, about 0.5 GB); shape options given "
            "explicitly win. Not with --moe-layers.",
            show_default=False,
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="Group size of the per-group layouts. Default 32; with --size-gb 256.", show_default=False),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="Safetensors shards to cut it into. Default 4; with --size-gb one per 4 GB (at least 4), about "
            "the shard size of a real 400 GB checkpoint.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    output: Output,
) -> None:
    """Write a synthetic W4A8_DYNAMIC checkpoint of a model family as msModelSlim (or LLM-Compressor) writes
    it: tiny by default (for demos and tests), any size with the shape options."""
    from ..errors import BadInputError
    from ..synthetic import SyntheticSpec, moe_layers_for, write_checkpoint

    if layout not in SOURCE_NAMES:
        raise BadInputError(f"--layout {layout}: choose one of {', '.join(SOURCE_NAMES)}")
    if family not in FAMILY_NAMES:
        raise BadInputError(f"--family {family}: choose one of {', '.join(FAMILY_NAMES)}")
    if SOURCES[layout].described_by_config and family != FAMILY_NAMES[0]:
        raise BadInputError(
            f"--layout {layout} --family {family}: LLM-Compressor's layout is written for {FAMILY_NAMES[0]} only"
        )
    model = FAMILIES[family]
    if dense_layers is None:
        dense_layers = min(1, model.public.dense_layers)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"{path}: exists and is not an empty directory")
    if size_gb is not None and moe_layers is not None:
        raise BadInputError("--moe-layers with --size-gb: --size-gb chooses the number of MoE layers; give one of them")
    for name, value in (
        ("--size-gb", size_gb),
        ("--experts", experts),
        ("--moe-layers", moe_layers),
        ("--shards", shards),
    ):
        if value is not None and value <= 0:
            raise BadInputError(f"{name} {value}: must be positive")
    if dense_layers < 0:
        raise BadInputError(f"--dense-layers {dense_layers}: must be 0 or more")
    scaled = size_gb is not None  # DeepSeek-shaped, scaled to the size
    if shards is None:
        shards = max(4, round(size_gb / 4)) if scaled else 4
    hidden = hidden if hidden is not None else (model.public.hidden if scaled else 128)
    intermediate = intermediate if intermediate is not None else (model.public.intermediate if scaled else 64)
    if group_size is None:  # DeepSeek's 256 at scale, or the largest that divides the shapes given
        fits = [g for g in (256, 128, 64, 32, 16) if hidden % g == 0 and intermediate % g == 0]
        group_size = (fits[0] if fits else 256) if scaled else 32
    if group_size <= 0:
        raise BadInputError(f"--group-size {group_size}: must be positive")
    if experts is None:
        experts = min(model.public.experts, 1 << max(3, int(math.log2(max(1.0, 8 * size_gb))))) if scaled else 4
    for name, value, step in (("--hidden", hidden, group_size), ("--intermediate", intermediate, group_size)):
        if value < 16 or value % 16 or value % step:
            raise BadInputError(f"{name} {value}: needs a positive multiple of 16 and of --group-size {group_size}")
    spec = SyntheticSpec(
        hidden=hidden,
        intermediate=intermediate,
        experts=experts,
        dense_layers=dense_layers,
        moe_layers=moe_layers or 2,
        group_size=group_size,
        shards=shards,
        seed=seed,
        # DeepSeek's MTP layer (W8A8 experts) and QuaRot's hidden^2 rotation are a 62nd and a 2,000th of
        # DeepSeek-R1, but most of a few-GB model: left out at scale, as the bench leaves them out.
        mtp_layers=0 if scaled else 1,
        quarot=not scaled,
        family=family,
    )
    if size_gb is not None:
        spec = moe_layers_for(spec, layout, size_gb * 1e9)
    progress = output.progress("writing", done="written", units="layers")
    try:
        write_checkpoint(path, layout, spec, progress=progress)
    finally:
        progress.finish()
    from ..reading.checkpoint import open_checkpoint

    size = open_checkpoint(path).total_bytes  # its shards, as inspect and convert count them
    if output.json_mode:
        output.emit_json(
            {
                "ok": True,
                "out_dir": str(path),
                "layout": layout,
                "family": family,
                "moe_layers": spec.moe_layers,
                "input_bytes": size,
            }
        )
    else:
        output.info(
            f"wrote a synthetic {model.label} {layout} checkpoint to {path}: {plural(spec.moe_layers, 'MoE layer')}, "
            f"{human_bytes(size)} of shards"
        )


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _usage_error(error: Exception) -> int:
    """An argument error Typer caught: its usage text, or with ``--json`` one JSON object on stdout and
    one line on stderr."""
    if "--json" in sys.argv[1:]:
        Output(json_mode=True).error(error.format_message())
    else:
        error.show()
    return error.exit_code


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)  # a clean stop, as for Ctrl-C: one line, the work so far kept
    try:
        code = app(prog_name="w4a8conv", standalone_mode=False)  # also under `python -m w4a8conv`
    except SystemExit as stop:
        code = stop.code
    except (KeyboardInterrupt, Terminated) as stop:  # between commands' own handling: parsing, imports
        name, code = interruption(stop)
        Output(json_mode="--json" in sys.argv[1:]).error(f"interrupted by {name}; nothing was written")
    except Exception as e:
        if not (type(e).__module__.startswith("typer") and hasattr(e, "format_message")):
            raise
        code = _usage_error(e) if hasattr(e, "show") else EXIT_FAILURE
    if code == EXIT_INTERRUPTED[signal.SIGINT] and not Output.said_an_error:  # Typer's own Ctrl-C: silent
        Output(json_mode="--json" in sys.argv[1:]).error("interrupted by SIGINT; nothing was written")
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
