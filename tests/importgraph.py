"""The toolchain package's own imports, read with ast (nothing is imported): each edge says whether it runs when
the module loads (module level) or when a function runs (function-local), and TYPE_CHECKING imports are left out
(they never run). Importing a.b.c runs a/__init__ and a/b/__init__ first, so an edge to a submodule is also an edge
to the packages above it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "toolchain"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str  # "module" (runs when the module loads), "local" (when a function runs), "typing" (never runs)
    line: int

    def __str__(self) -> str:
        where = {"module": "module level", "local": "function-local", "typing": "TYPE_CHECKING"}[self.kind]
        return f"{self.src} -> {self.dst} ({where}, line {self.line})"


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(import node, kind) for every import statement."""
    def walk(node: ast.AST, kind: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        yield sub, "typing"
                for sub in child.orelse:
                    yield from walk(sub, kind)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, kind
            inner = "local" if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else kind
            yield from walk(child, "typing" if kind == "typing" else inner)
    yield from walk(tree, "module")


def _with_parents(name: str, known: dict[str, Path]) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known]


def edges(root: Path) -> list[Edge]:
    known = modules(root)
    out: list[Edge] = []
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node, kind in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                for dst in _with_parents(t, known):
                    if dst != mod and not mod.startswith(dst + "."):  # a package's own parents are loaded already
                        out.append(Edge(mod, dst, kind, node.lineno))
    return sorted(set(out), key=lambda e: (e.src, e.dst, e.kind, e.line))


def cycles(es: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in es:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)
