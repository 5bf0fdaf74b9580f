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


def _private_uses(modules: dict[str, str]) -> list[str]:
    """``from M import _helper`` and ``M._helper`` where M is another module of the package and
    ``_helper`` is not itself a module (``from .. import _ext`` is an import of a module)."""
    found = []
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        tree = ast.parse(open(path).read(), path)
        module_aliases = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - (node.level - 1)] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                if base.split(".")[0] != "dnr":
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in modules:
                        module_aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path}:{node.lineno}: from {base} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "dnr" and a.asname:
                        module_aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and f"{module_aliases[node.value.id]}.{node.attr}" not in modules):
                found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_private_use_reader_sees_both_forms(tmp_path):
    pkg = tmp_path / "dnr"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    pass\n")
    (pkg / "b.py").write_text("from .a import _helper\nfrom . import a\na._helper()\nfrom . import _ok\n")
    (pkg / "_ok.py").write_text("")
    mods = {n: str(pkg / f) for n, f in (("dnr", "__init__.py"), ("dnr.a", "a.py"), ("dnr.b", "b.py"),
                                         ("dnr._ok", "_ok.py"))}
    assert [f.split(": ", 1)[1] for f in _private_uses(mods)] == ["from dnr.a import _helper", "a._helper"]


def test_no_module_uses_another_modules_underscore_helpers():
    found = _private_uses(_modules())
    assert not found, "promote these to public names: " + "; ".join(found)


REPO = os.path.dirname(os.path.dirname(ROOT))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, "docs")), reason="needs the source checkout")
def test_the_docs_the_code_cites_exist():
    import re
    cited = set()
    for top in ("python", "csrc"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith((".py", ".h", ".cpp", ".cu", ".cuh")):
                    text = open(os.path.join(folder, f), errors="replace").read()
                    # the repository's own docs/ (not ../shared/docs, which lives outside the repository)
                    cited |= {m.rstrip(".") for m in re.findall(r"(?<![\w/.])docs/[\w./-]+", text)}
    assert "docs/method.md" in cited
    missing = sorted(c for c in cited if not os.path.exists(os.path.join(REPO, c)))
    assert not missing, f"cited but not in the repository: {missing}"
