"""The package's layers (README "Code layout", docs/design.md): imports point down only, no
import cycles, and the pure layer does no I/O.

    cli -> commands -> engine -> {report, service} -> {core, kernel} -> {errors, paths, files}

``kernel`` may use ``core``'s plain data types (a knob ``Write``, a ``Guest``), never the
reverse; ``report`` (observers of a finished tick) has no kernel access.  Imports inside functions count too; only ``if TYPE_CHECKING:`` blocks are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ksmtuned"

#: layer -> rank; a module may import modules of a lower rank or of its own layer's package
RANK = {"errors": 0, "paths": 0, "files": 0, "core": 1, "kernel": 2, "report": 3, "service": 3, "engine": 4,
        "commands": 5, "cli": 6, "__main__": 7}
#: what the pure layer may not import: I/O, clocks, logging, processes
IMPURE = {"logging", "time", "subprocess", "socket", "shutil", "fcntl", "signal", "psutil", "threading",
          "select", "selectors", "http", "urllib", "sdnotify", "prometheus_client"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (absolute names), plus external top-level names
    prefixed with '!'."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for sub in node.body for n in ast.walk(sub))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "ksmtuned":
                out.add("!" + t.split(".")[0])
                continue
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself (__version__)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w.startswith("!") or w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_known_layer():
    unknown = [n for n in modules() if layer(n) is not None and layer(n) not in RANK]
    assert unknown == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_sees_a_cycle():
    """The checker itself: a two-module cycle is found (so an empty answer means something)."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_imports_point_down():
    wrong = []
    for name, targets in graph().items():
        me = layer(name)
        if me is None:
            continue
        for t in targets:
            there = layer(t) if not t.startswith("!") else None
            if there is None or there == me:
                continue
            if RANK[there] >= RANK[me] or (me == "report" and there == "kernel"):
                wrong.append(f"{name} -> {t}")
    assert wrong == []


@pytest.mark.parametrize("name", sorted(n for n in modules() if layer(n) == "core"))
def test_core_is_pure(name):
    used = {t[1:] for t in graph()[name] if t.startswith("!")}
    assert used & IMPURE == set(), f"{name} imports {sorted(used & IMPURE)}"
    text = modules()[name].read_text()
    assert "open(" not in text, f"{name} opens files"


def test_commands_never_import_cli():
    assert [n for n, ts in graph().items() if layer(n) == "commands" and "ksmtuned.cli" in ts] == []
