"""docs/cli.md is what scripts/cli_reference.py writes from the app: the reference is never stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_current():
    generated = _generator().reference()
    assert (ROOT / "docs" / "cli.md").read_text() == generated, "docs/cli.md is stale: run `make docs`"


def test_the_reference_names_every_command_and_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    for command in ("inspect", "convert", "verify", "finalize", "synthetic"):
        assert f"## `w4a8conv {command}`" in text
    for option in ("`--array-size`", "`--array-index`", "`--quiet` / `-q`", "`--target` `[vllm-ascend-0.23|"):
        assert option in text
    assert "--num-workers" not in text  # hidden: refused with a hint
