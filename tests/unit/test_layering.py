"""Imports point one way (issue 20): every import inside cldist/ - at module level or inside a
function - goes to a package on the same floor or a lower one, and no two packages import each
other. The floors, lowest first:"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "cldist"

FLOORS = [
    ("errors", "atomic_io", "choices"),
    ("data", "models"),
    ("config", "rundir"),
    ("coordinator",),
    ("methods",),
    ("train",),
    ("eval",),
    ("assemble",),
    ("runners", "report"),
    ("distributed", "stream"),
    ("bench", "sweep"),
    ("cli",),
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _unit(path: Path) -> str:
    """The package (or top-level module) of cldist a file belongs to."""
    first = path.relative_to(ROOT).parts[0]
    return first[:-3] if first.endswith(".py") else first


def _imports(path: Path):
    """(line, imported cldist unit) for every import of another part of cldist in `path`."""
    package = ["cldist", *path.relative_to(ROOT).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # `from .. import data` names a package, not an attribute
                modules = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                modules = [node.module or ""]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "cldist" and len(parts) > 1:
                yield node.lineno, parts[1]


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == ROOT:
            continue  # cldist/__init__.py: the package root, above every floor
        source = _unit(path)
        for line, target in _imports(path):
            if target != source:
                yield f"{path.relative_to(ROOT.parent)}:{line}", source, target


def test_every_part_of_cldist_has_a_floor():
    units = {_unit(p) for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py"}
    assert units <= set(FLOOR), f"give these a floor in FLOORS: {sorted(units - set(FLOOR))}"


def test_no_import_runs_back_up():
    upward = [f"{where}: {source} (floor {FLOOR.get(source)}) imports {target} "
              f"(floor {FLOOR.get(target)})" for where, source, target in _edges()
              if FLOOR.get(target, -1) > FLOOR.get(source, -1)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circle_between_packages():
    pairs = {(source, target) for _, source, target in _edges()}
    circles = sorted({tuple(sorted(p)) for p in pairs if (p[1], p[0]) in pairs})
    assert not circles, f"packages importing each other: {circles}"


def test_train_and_eval_read_no_config():
    """train/ and eval/ take objects and plain values; cldist.assemble turns a config into
    them (issue 20)."""
    reading = [f"{where}: {source} imports {target}" for where, source, target in _edges()
               if source in ("train", "eval") and target == "config"]
    assert not reading, "\n".join(reading)


def test_train_and_eval_do_not_import_each_other():
    crossing = [f"{where}: {source} imports {target}" for where, source, target in _edges()
                if {source, target} == {"train", "eval"}]
    assert not crossing, "\n".join(crossing)
