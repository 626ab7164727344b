"""Write docs/cli.md, the command-line reference, from the app itself (`make docs`).

`tests/test_cli_reference.py` fails when the file differs from what this writes, so the reference
cannot fall behind the code.

    python scripts/cli_reference.py            # rewrite docs/cli.md
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import typer

from w4a8conv.cli import app

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "cli.md"


_TYPE_NAMES = {Path: "PATH", int: "INTEGER", float: "FLOAT", str: "TEXT"}


def _value_types(command_name: str) -> dict[str, str]:
    """Each parameter's value type, from the command function's annotations (the same under every
    Typer release, where the Click objects Typer builds are not)."""
    callback = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command_name)
    names = {}
    for name, hint in typing.get_type_hints(callback).items():
        plain = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        names[name] = _TYPE_NAMES.get(plain[0], "VALUE")
    return names


def _value(param, types: dict[str, str]) -> str:
    """How an option's value is written: its choices, else its type."""
    if param.is_flag:
        return ""
    return f" `{param.metavar or types.get(param.name, 'VALUE')}`"


def _default(param) -> str:
    default = param.default
    if default is None or (param.is_flag and not default):
        return ""
    if isinstance(default, bool):
        return " Default: on."
    return f" Default: `{default}`."


def _sentence(text: str | None) -> str:
    text = (text or "").strip()
    return text if not text or text.endswith(".") else text + "."


def _option(param, types: dict[str, str]) -> str:
    names = " / ".join(f"`{name}`" for name in [*param.opts, *param.secondary_opts])
    required = " Required." if param.required else ""
    return f"- {names}{_value(param, types)}: {_sentence(param.help)}{required}{_default(param)}"


def reference() -> str:
    """The Markdown reference of every command, from the Click command Typer builds."""
    group = typer.main.get_command(app)
    lines = [
        "# Command-line reference",
        "",
        "What you get here: every command, argument and option, with its default, as `w4a8conv COMMAND -h` says it.",
        "Generated from the app by `scripts/cli_reference.py` (`make docs`); a test fails when it is stale.",
        "Every command takes `-h` / `--help`; `python -m w4a8conv` is the same as `w4a8conv`.",
        "",
        (group.help or "").strip(),
        "",
        "Exit codes: 0 ok, 1 failure (I/O, a failed verification), 2 bad input (nothing written), "
        "130 / 143 interrupted (SIGINT / SIGTERM).",
    ]
    for name, command in group.commands.items():
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        usage = " ".join(["w4a8conv", name, "[OPTIONS]", *(p.name.upper() for p in arguments)])
        lines += ["", f"## `w4a8conv {name}`", "", f"    {usage}", "", (command.help or "").strip(), ""]
        for param in arguments:
            lines.append(f"- `{param.name.upper()}`: {_sentence(getattr(param, 'help', None))}")
        types = _value_types(name)
        lines += [_option(param, types) for param in options]
    return "\n".join(lines) + "\n"


def main() -> None:
    REFERENCE.write_text(reference())
    print(f"wrote {REFERENCE.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
