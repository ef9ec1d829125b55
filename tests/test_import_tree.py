"""The import graph of the project's packages is a tree of tiers, checked by parsing the source.

Tiers, ground floor first: ``mobile_client`` (numpy + onnxruntime + stdlib) <- ``fmtl_lightning``
<- ``export`` <- ``benchmarks``. Every ``import``/``from ... import`` statement of every module of
these packages is read with :mod:`ast` (no module is imported), at module level and inside
functions/methods ("lazy" imports), including ``if TYPE_CHECKING:`` blocks for the tier rule.
An edge goes to the most specific project module named (``from a.b import c`` -> ``a.b.c`` if
that is a module, else ``a.b``); the implicit import of parent packages' ``__init__`` is not an
edge (the packages' ``__init__`` modules import nothing of the project's other modules).

Checked:
* ``mobile_client`` imports nothing from ``fmtl_lightning``, ``export`` or ``benchmarks``;
* no ``export`` module reaches ``fmtl_lightning.simulation``, directly or through any chain of
  imports (module-level or lazy);
* the graph has no cycles: every strongly connected component is a single module, once over
  module-level imports and once over module-level plus lazy imports (``TYPE_CHECKING`` imports
  are left out of the cycle check: they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mobile_client", "fmtl_lightning", "export", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _targets(mod: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The project modules an import statement of module ``mod`` names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            pkg = mod.split(".")
            if not MODULES[mod].name == "__init__.py":
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    for name in names:
        while name and name not in MODULES:  # "a.b.c" of a module "a.b": the module
            name = name.rpartition(".")[0]
        if name and name != mod:
            yield name


def _edges() -> dict[str, dict[str, set[str]]]:
    """module -> {"module": targets, "lazy": targets, "typing": targets}."""
    out: dict[str, dict[str, set[str]]] = {}
    for mod, path in MODULES.items():
        kinds: dict[str, set[str]] = {"module": set(), "lazy": set(), "typing": set()}

        def visit(node: ast.AST, kind: str, mod: str = mod, kinds=kinds) -> None:
            for child in ast.iter_child_nodes(node):
                k = kind
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    k = "lazy" if kind == "module" else kind
                elif isinstance(child, ast.If) and _is_type_checking(child):
                    for n in child.body:
                        visit(ast.Module(body=[n], type_ignores=[]), "typing")
                    for n in child.orelse:
                        visit(ast.Module(body=[n], type_ignores=[]), kind)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    kinds[k].update(_targets(mod, child))
                visit(child, k)

        visit(ast.parse(path.read_text(), str(path)), "module")
        out[mod] = kinds
    return out


EDGES = _edges()


def _graph(*kinds: str) -> dict[str, set[str]]:
    return {m: set().union(*(e[k] for k in kinds)) for m, e in EDGES.items()}


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start`` -> the module that imports it on the way."""
    seen = {start: ""}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph[v]):
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def _chain(seen: dict[str, str], end: str) -> str:
    path = [end]
    while seen[path[-1]]:
        path.append(seen[path[-1]])
    return " -> ".join(reversed(path))


def test_the_parser_sees_the_known_imports():
    """Guards the checks below against a parser that finds nothing."""
    assert len(MODULES) > 40
    assert "fmtl_lightning.roles" in EDGES["fmtl_lightning.slicing"]["module"]
    assert "mobile_client.fileio" in EDGES["fmtl_lightning.simulation"]["module"]
    # a function-level import is a lazy edge
    assert "export.run_export" in EDGES["fmtl_lightning.edge_bridge"]["lazy"]
    assert "fmtl_lightning.models" in EDGES["fmtl_lightning.run_artifacts"]["typing"]


def test_mobile_client_imports_nothing_above_it():
    bad = [
        f"{m} imports {t} ({kind})"
        for m, e in EDGES.items()
        if m.split(".")[0] == "mobile_client"
        for kind, targets in e.items()
        for t in sorted(targets)
        if t.split(".")[0] != "mobile_client"
    ]
    assert not bad, "\n".join(bad)


def test_export_does_not_reach_the_simulation():
    graph = _graph("module", "lazy")
    bad = []
    for m in MODULES:
        if m.split(".")[0] == "export":
            seen = _reach(graph, m)
            if "fmtl_lightning.simulation" in seen:
                bad.append(_chain(seen, "fmtl_lightning.simulation"))
    assert not bad, "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    cycles = [c for c in _sccs(_graph("module")) if len(c) > 1]
    assert not cycles, cycles


def test_module_level_and_lazy_imports_have_no_cycle():
    cycles = [c for c in _sccs(_graph("module", "lazy")) if len(c) > 1]
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert sorted(map(sorted, _sccs(g))) == [["a", "b", "c"], ["d"]]


def test_one_task_name_sanitiser_and_one_npz_reader():
    """The task-name sanitiser (head modules, metrics, data-file label keys) is defined once,
    on the ground floor (``mobile_client.batching.head_name``), and ``.npz`` files are read only
    through ``mobile_client.inputs``' checked reader (never ``np.load``)."""
    sanitisers, np_load = [], []
    for mod, path in MODULES.items():
        text = path.read_text()
        if '.replace("/", "__")' in text or ".replace('/', '__')" in text:
            sanitisers.append(mod)
        if "np.load(" in text or "numpy.load(" in text:
            np_load.append(mod)
    assert sanitisers == ["mobile_client.batching"]
    assert np_load == []
