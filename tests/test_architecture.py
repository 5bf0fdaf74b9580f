"""The package's layering: no import cycle between its modules, and the lower layers (ops, nn, engine,
attacks, methods) and the package's public root never import the harness -- at module level or inside a
function. The import graph is read from the sources (ast), so lazy imports count too."""

from __future__ import annotations

import ast
import os

import pytest

import dnr

ROOT = os.path.dirname(dnr.__file__)
# the layers below the harness: they must not reach dnr.harness, directly or through another module
LOWER_LAYERS = ("dnr", "dnr.ops", "dnr.nn", "dnr.engine", "dnr.attacks", "dnr.methods")


def _modules() -> dict[str, str]:
    """Module name -> source path of every .py file of the package (a package is its __init__)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (``from pkg import sub`` is an
    import of ``pkg.sub`` when that is a module, else of ``pkg``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here[:len(here) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import dnr.x.y` names the module dnr.x.y (or a prefix)
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_reader_sees_function_level_imports_and_cycles(tmp_path):
    """The oracle itself: a lazy import inside a function is an edge, and a two-module loop is a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    mods = {"pkg": str(pkg / "__init__.py"), "pkg.a": str(pkg / "a.py"), "pkg.b": str(pkg / "b.py")}
    graph = import_graph(mods)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_between_the_package_modules():
    found = cycles(import_graph(_modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_reach_the_harness(layer):
    graph = import_graph(_modules())
    starts = [m for m in graph if m == layer or (layer != "dnr" and m.startswith(layer + "."))]
    assert starts, f"no module {layer}"
    seen, todo, parent = set(starts), list(starts), {}
    while todo:
        m = todo.pop()
        for n in graph[m]:
            if n not in seen:
                seen.add(n)
                parent[n] = m
                todo.append(n)
    bad = sorted(m for m in seen if m == "dnr.harness" or m.startswith("dnr.harness.") or m == "dnr.cli")
    if bad:
        chain, m = [bad[0]], bad[0]
        while m in parent:
            m = parent[m]
            chain.append(m)
        pytest.fail(f"{layer} reaches {bad[0]}: " + " -> ".join(reversed(chain)))
