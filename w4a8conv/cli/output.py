"""All printing: Rich for people, JSON for machines, plain lines in CI logs. Chosen once per command.

Results go to stdout (a table, a summary line, or with ``--json`` one JSON object); progress and
errors to stderr, in every mode. Output that is not a terminal is never wrapped: a line in a log or a
pipe is one line however long.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.progress import Progress as RichBar
from rich.table import Table
from rich.text import Text

from ..names import PROCESSED_FORMAT
from ..progress import Progress


def human_value(value: object) -> str:
    """A value as people read it: never Python's ``None``, ``[]`` or quotes."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(human_value, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {human_value(v)}" for k, v in value.items())
    return str(value)


def plural(count: int, word: str) -> str:
    """``1 shard``, ``2 shards``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def group_words(group_size: int | None) -> str:
    """How a group size reads: ``per-channel`` for 0, as everywhere else in the tool."""
    return "per-channel" if group_size == 0 else f"group size {group_size}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


SHOWN_PROBLEMS = 10  # verify's problems shown to people; --json lists more
PROGRESS_INTERVAL = 30.0  # seconds between progress lines in logs, at most, while work goes on
_UNWRAPPED = 1 << 16  # columns of a console that is not a terminal: wide enough to wrap nothing


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if terminal else _UNWRAPPED, soft_wrap=not terminal)


class Output:
    """Where a command's words go. ``json_mode``: one JSON object on stdout, nothing else there;
    ``quiet``: no progress and no human result, only errors (and the JSON object)."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode, self.quiet = json_mode, quiet
        self.err = _console(stderr=True)
        self.out = _console(stderr=False)
        self.interactive = self.err.is_terminal and not os.environ.get("CI")

    def emit_json(self, data: dict) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()

    said_an_error = False  # this process printed an error line (main adds one where nothing else did)

    def error(self, message: str) -> None:
        """One line on stderr; with ``--json`` also a JSON object on stdout, so callers can parse it."""
        Output.said_an_error = True
        self.err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
        if self.json_mode:
            self.emit_json({"ok": False, "error": message})

    def warning(self, message: str) -> None:
        """One line on stderr (not with ``--quiet``)."""
        if not self.quiet:
            self.err.print(Text.assemble(("warning:", "bold yellow"), " ", message), soft_wrap=True)

    def info(self, message: str) -> None:
        """A human result on stdout (not with ``--json`` or ``--quiet``)."""
        if not self.json_mode and not self.quiet:
            self.out.print(message, soft_wrap=True, markup=False)

    def inspect_table(self, report) -> None:
        """An ``inspect.InspectReport`` as a table, then its problems."""
        table = Table(title=Text(f"w4a8conv inspect {report.path}"), show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        rows = [
            ("format", report.format),
            ("target", report.target or "-"),
            *[(f"contract: {key}", value) for key, value in report.contract.items() if key != "target"],
            *(
                [
                    ("targets that serve it", ", ".join(report.serving_targets) or "none"),
                    ("convert with", f"--target {report.convert_with}" if report.convert_with else "-"),
                ]
                if report.format != PROCESSED_FORMAT
                else []
            ),
            ("version", report.version or "-"),
            ("group size", "per-channel (0)" if report.group_size == 0 else report.group_size),
            ("W4A8 modules", f"{report.modules} ({report.w4a8_linear} Linear)"),
            (
                "MoE layers",
                f"{report.moe_layers} x {human_value(report.experts_per_layer)} experts"
                + (
                    f" (hidden {report.hidden_size}, moe_intermediate {report.moe_intermediate_size})"
                    if report.hidden_size
                    else ""
                ),
            ),
            ("experts", report.experts_naming or "-"),
            ("other quant types", ", ".join(f"{k}: {v}" for k, v in report.other_quant_types.items()) or "-"),
            ("params dtype", report.params_dtype),
            ("shards / tensors", f"{report.shards} / {report.tensors}"),
            ("size", human_bytes(report.input_bytes)),
            ("size after convert", human_bytes(report.output_bytes)),
        ]
        for key, value in rows:
            table.add_row(key, Text(human_value(value)))
        self.out.print(table)
        for note in report.notes:
            self.out.print(f"note: {note}", markup=False, soft_wrap=True)
        for unchecked in report.not_checked:
            self.out.print(f"not checked: {unchecked}", markup=False, soft_wrap=True)
        if report.problems:
            count = len(report.problems)
            self.out.print(Text(f"{count} problem{'s' if count != 1 else ''}:", style="bold red"))
            for problem in report.problems:
                self.out.print(f"  - {problem}", markup=False, soft_wrap=True)
        else:
            self.out.print(Text("no problems found", style="green"))

    def verify_report(self, report) -> None:
        checked = f"{report.modules_checked} of {plural(report.modules_total, 'W4A8 module')}"
        hashed = plural(report.files_hashed, "file") + " hashed"
        hashed = hashed if report.manifest else "no checksum manifest (--no-checksums)"
        copied = f"{plural(report.passthrough_checked, 'pass-through tensor')}, "
        copied += plural(report.other_files_checked, "other file")
        summary = f"{checked}, {copied}, {hashed}"
        if report.numeric_checks:
            summary += f", {plural(report.numeric_checks, 'operator check')}"
        if report.ok:
            self.out.print(Text.assemble(("verified: ", "bold green"), summary))
            return
        self.out.print(Text.assemble(("verification failed: ", "bold red"), summary))
        shown = report.problems[:SHOWN_PROBLEMS]
        for problem in shown:
            self.out.print(f"  - {problem}", markup=False, soft_wrap=True)
        if report.problems_total > len(shown):
            listed = f"the first {len(report.problems)} listed with --json"
            self.out.print(f"  ... and {report.problems_total - len(shown)} more problems ({listed})", markup=False)

    def progress(self, label: str = "converting", done: str = "read", units: str = "modules") -> Progress:
        """Progress on stderr: a Rich bar on a terminal, a line per shard in logs, none with ``--quiet``.
        ``done`` says what happened to the bytes counted, ``units`` what the modules are."""
        if self.quiet:
            return Progress()
        if self.interactive:
            return RichProgress(self.err, label, units)
        return LineProgress(self.err, label, done=done, units=units)


class LineProgress(Progress):
    """Progress for CI logs: a line when the work starts, one per output shard written, one at least
    every ``interval`` seconds whatever the work is doing (a clock thread, so a long module or a
    verification that writes no shard is not silent), and one when it ends."""

    def __init__(
        self,
        console: Console,
        label: str = "converting",
        interval: float | None = None,
        done: str = "read",
        units: str = "modules",
    ):
        self.console, self.label, self.done, self.units = console, label, done, units
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None

    def start(self, total_bytes: int, total_modules: int) -> None:
        self.total_bytes, self.total_modules = total_bytes, total_modules
        self.done_bytes = self.done_modules = 0
        self.started = self.last_line = time.monotonic()
        self._line(f"{self.label} started")
        if self.interval > 0:
            self._stop.clear()
            self._clock = threading.Thread(target=self._tick, name="progress-clock", daemon=True)
            self._clock.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self.last_line >= self.interval:
                self._line(self.label)

    def update(self, event: str, name: str, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_modules += event == "module"
        if event == "shard":
            self._line(f"wrote {name}")
        elif self.interval <= 0:
            self._line(self.label)

    def finish(self) -> None:
        if self._clock is not None:
            self._stop.set()
            self._clock.join()
            self._clock = None
        if hasattr(self, "started"):
            self._line(f"{self.label} ended")

    def _line(self, what: str) -> None:
        self.last_line = time.monotonic()
        elapsed = max(self.last_line - self.started, 1e-9)
        self.console.print(
            f"[{elapsed:7.1f}s] {what}: {human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)} "
            f"{self.done}, {self.done_modules}/{self.total_modules} {self.units}, "
            f"{self.done_bytes / elapsed / 1e6:.0f} MB/s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


class RichProgress(Progress):
    """A live bar with bytes, rate, modules and ETA."""

    def __init__(self, console: Console, label: str = "converting", units: str = "modules"):
        self.label, self.units = label, units
        self.bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[modules]}"),
            TimeRemainingColumn(),
            console=console,
        )

    def start(self, total_bytes: int, total_modules: int) -> None:
        self.total_modules, self.done_modules, self.done_shards = total_modules, 0, 0
        self.task = self.bar.add_task(self.label, total=total_bytes, modules=f"0/{total_modules} {self.units}")
        self.bar.start()

    def update(self, event: str, name: str, nbytes: int) -> None:
        self.done_modules += event == "module"
        self.done_shards += event == "shard"
        modules = f"{self.done_modules}/{self.total_modules} {self.units}"
        if self.done_shards:
            modules += f", {self.done_shards} shards written"
        self.bar.update(self.task, advance=nbytes, modules=modules)

    def finish(self) -> None:
        self.bar.stop()
