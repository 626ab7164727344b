"""The package tree shows the pipeline, and imports go only downward: a layer imports its own and the
layers below it, never one above (a type-only import counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import w4a8conv

PACKAGE = Path(w4a8conv.__file__).parent
# Bottom first. Layers on one line may not import each other.
LAYERS = [
    {"errors", "names", "experts", "progress", "__init__"},
    {"safetensors_io"},
    {"formats"},
    {"reading"},
    {"planning"},
    {"converting", "serving"},
    {"verify", "synthetic"},
    {"cli"},
    {"__main__"},
]
RANK = {top: rank for rank, layer in enumerate(LAYERS) for top in layer}


def _top(module: str) -> str:
    return module.split(".")[0] or "__init__"


def _imports(path: Path) -> list[str]:
    """Every w4a8conv module ``path`` imports, as dotted names under the package."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(module if module[-1] == "__init__" else module[:-1])
    if package and package[-1] == "__init__":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if not node.module:  # from . import x: x is a module, or a name of the package
                for alias in node.names:
                    module = [*target, alias.name]
                    is_module = (
                        PACKAGE.joinpath(*module).with_suffix(".py").exists() or PACKAGE.joinpath(*module).is_dir()
                    )
                    found.append(".".join(module if is_module else target))
            else:
                found.append(".".join(target))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("w4a8conv"):
            found.append(node.module.removeprefix("w4a8conv").lstrip("."))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("w4a8conv").lstrip(".") for a in node.names if a.name.startswith("w4a8conv")]
    return found


def test_every_top_level_name_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    names.discard("__pycache__")
    assert names == set(RANK)


def test_imports_go_only_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _top(str(path.relative_to(PACKAGE).with_suffix("")).replace("/", "."))
        for imported in _imports(path):
            if RANK[_top(imported)] > RANK[own] or (RANK[_top(imported)] == RANK[own] and _top(imported) != own):
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not upward, "\n".join(upward)


def test_one_module_per_name():
    """No two modules share a name (there were two ``compressed_tensors``), but for each package's own."""
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.stem not in {"__init__", "__main__", "base"}]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
