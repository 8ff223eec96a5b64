"""The house rules of ``node/``, read from the source: who may import what, and no circles.

* SQL and database drivers live only in the storage backends
  (``node/storage/sqlite/``, later ``node/storage/postgresql/``);
* pynetdicom only in ``node/dimse/``, Starlette only in ``node/web/``;
* the storage package depends on nothing above it;
* no module imports, directly or through others, a module that imports it
  (function-level and type-checking imports count: they are still a circle
  for the reader, and the next refactor turns them into real ones).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "node"
BACKENDS = ("node.storage.sqlite", "node.storage.postgresql")
SQL = re.compile(r"\b(SELECT\b[\s\S]*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM"
                 r"|CREATE\s+(TABLE|INDEX|TRIGGER)|PRAGMA\s+\w+)\b")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"))


def imported(name: str) -> Iterator[str]:
    """Every module ``name`` imports (absolute names; ``from a import b`` is ``a.b`` when
    that is a module, else ``a``), anywhere in the file."""
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules():
                    yield f"{node.module}.{alias.name}"


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def offenders(rule) -> list[str]:
    return sorted(f"{name} imports {target}" for name in modules() for target in imported(name)
                  if rule(name, target))


def test_database_drivers_only_in_the_storage_backends():
    assert offenders(lambda name, target: within(target, "sqlite3", "sqlite_utils", "psycopg")
                     and not within(name, *BACKENDS)) == []


def test_pynetdicom_only_in_the_dimse_layer():
    assert offenders(lambda name, target: within(target, "pynetdicom")
                     and not within(name, "node.dimse")) == []


def test_starlette_only_in_the_web_layer():
    assert offenders(lambda name, target: within(target, "starlette", "uvicorn")
                     and not within(name, "node.web")) == []


def test_storage_depends_on_nothing_above_it():
    allowed = ("node.storage", "node.status")
    assert offenders(lambda name, target: within(name, "node.storage") and target != "node"
                     and within(target, "node") and not within(target, *allowed)) == []


def test_no_sql_text_outside_the_storage_backends():
    found = []
    for name in modules():
        if within(name, *BACKENDS):
            continue
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and SQL.search(node.value):
                found.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def graph() -> dict[str, set[str]]:
    """Module → the node modules it needs: what it imports, and the packages above those
    (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    edges: dict[str, set[str]] = {}
    for name in modules():
        targets = set()
        for target in imported(name):
            if not within(target, "node"):
                continue
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        # A package's own submodules are imported by it, never "above" it.
        edges[name] = {t for t in targets if t in modules() and t != name
                       and not within(name, t)}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(graph()) == []


@pytest.mark.parametrize(("edges", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_circle_finder_finds_circles(edges, expected):
    assert cycles(edges) == expected
