"""The docs' commands and options are the app's: every `w4a8conv ...` and `make ...` in README.md and
docs/*.md names a command, option and target that exist, and every page is linked and says first what
a reader gets from it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from w4a8conv.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CHANGELOG.md"]
GROUP = typer.main.get_command(app)
# Options of every command, and the group's own (--version, -V, --help).
GLOBAL = {opt for param in GROUP.params for opt in (*param.opts, *param.secondary_opts)} | {"-h", "--help"}


def _options(command) -> set[str]:
    return GLOBAL | {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _code(text: str) -> list[str]:
    """Shell lines from fenced bash blocks (continuations joined, comments dropped) and inline spans."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split(" #")[0].strip() for line in joined.splitlines() if not line.lstrip().startswith("#")]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for line in lines if line]


def _invocations(text: str) -> list[list[str]]:
    """Every `w4a8conv COMMAND ...` (also inside quotes or after `--wrap`), and every inline span that is
    a bare `COMMAND --option ...`, as argument lists."""
    found = []
    for line in _code(text):
        for match in re.finditer(r"(?:^|[\s\"'(])w4a8conv((?:\s+[^\s\"'|;&)]+)*)", line):
            args = match.group(1).split()
            # In prose ("no w4a8conv target ...") only a known command is an invocation.
            if match.start() == 0 or (args and (args[0] in GROUP.commands or args[0].startswith("-"))):
                found.append(args)
        words = line.split()
        if len(words) > 1 and words[0] in GROUP.commands and words[1].startswith("-"):
            found.append(words)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_and_option_exists(page):
    if page.name == "cli.md":
        pytest.skip("generated from the app (tests/test_cli_reference.py)")
    wrong = []
    for args in _invocations(page.read_text()):
        if not args or args[0].startswith("-"):
            if args and not set(a.split("=")[0] for a in args if a.startswith("-")) <= GLOBAL:
                wrong.append(" ".join(args))
            continue
        command = GROUP.commands.get(args[0])
        if command is None:
            if re.fullmatch(r"[a-z-]+", args[0]) and args[0] not in {"w4a8conv"}:
                wrong.append(f"no command {args[0]!r}: {' '.join(args)}")
            continue
        unknown = [a for a in args[1:] if a.startswith("--") and a.split("=")[0] not in _options(command)]
        unknown += [a for a in args[1:] if re.fullmatch(r"-[a-zA-Z]", a) and a not in _options(command)]
        if unknown:
            wrong.append(f"w4a8conv {' '.join(args)}: {', '.join(unknown)}")
    assert not wrong, f"{page.name}:\n" + "\n".join(wrong)


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def _bench_options() -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', (ROOT / "scripts" / "bench.py").read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_make_target_and_bench_option_exists(page):
    wrong = []
    for line in _code(page.read_text()):
        for match in re.finditer(r"\bmake ([a-z][\w-]*)((?:\s+[A-Z_]+=(?:\"[^\"]*\"|\S+))*)", line):
            target, variables = match.groups()
            if target not in _make_targets():
                wrong.append(f"no make target {target!r}: {match.group(0)}")
            for name, value in re.findall(r"([A-Z_]+)=(\"[^\"]*\"|\S+)", variables):
                if name == "BENCH_ARGS":
                    options = {a.split("=")[0] for a in shlex.split(value.strip('"')) if a.startswith("--")}
                    wrong += [f"bench has no {o}: {match.group(0)}" for o in options - _bench_options()]
    assert not wrong, f"{page.name}:\n" + "\n".join(wrong)


def test_every_page_is_linked_from_the_readme_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name}: broken link {target}"


def test_every_anchor_link_names_a_heading():
    def anchors(page: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#]*\.md)?#([^)]+)\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            assert anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_page_starts_with_what_a_reader_gets(page):
    first = page.read_text().split("\n\n")[1]
    assert first.startswith("What you get here:"), first


def test_the_readme_first_screen_has_install_first_conversion_and_serving():
    """Its first 50 lines: the two set-up commands, inspect / convert / verify, and vllm serve."""
    screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:50])
    for needed in ("make demo", "make test", "w4a8conv inspect", "w4a8conv convert", "w4a8conv verify", "vllm serve"):
        assert needed in screen, needed
