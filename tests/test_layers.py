"""The package layering and the import graph, read off the sources (AST: every import counts,
the ones inside functions and under `if TYPE_CHECKING:` too).

    graphir  <-  hardware, reports  <-  passes  <-  backends  <-  planner  <-  cli

A module may import its own package and the packages of lower layers only; no two modules
import each other, directly or round a circle; every import of a project module names one
that exists. Each rule is also run on a made-up source that breaks it, so that the checks
themselves are known to fail when they should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"graphir": 0, "hardware": 1, "reports": 1, "passes": 2, "backends": 3, "planner": 4, "cli": 5}


def project_sources(root: Path = ROOT) -> dict[str, str]:
    """Module name -> source of every module of the layered packages."""
    out = {}
    for pkg in LAYER:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p.read_text(encoding="utf-8")
    return out


def imports(name: str, source: str, modules: set[str], is_package: bool = False) -> list[tuple[str, int]]:
    """(imported project name, line) of every import in `source` (module `name`): `from a
    import b` counts a.b when that is a module, else a; relative imports are resolved."""
    here = name if is_package else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            out += [(s, node.lineno) for s in subs] or [(base, node.lineno)]
    return [(m, line) for m, line in out if m.split(".")[0] in LAYER]


def import_graph(sources: dict[str, str]) -> tuple[nx.DiGraph, list[str]]:
    """The module import graph and the imports that name no module of the project."""
    mods = set(sources)
    g, missing = nx.DiGraph(), []
    g.add_nodes_from(mods)
    for name, src in sources.items():
        is_pkg = any(m.startswith(name + ".") for m in mods)
        for target, line in imports(name, src, mods, is_pkg):
            if target not in mods:
                missing.append(f"{name}:{line} imports {target}, which is no module of the project")
            elif target != name:
                g.add_edge(name, target, line=line)
    return g, missing


def violations(g: nx.DiGraph) -> list[str]:
    out = []
    for a, b, data in g.edges(data=True):
        pa, pb = a.split(".")[0], b.split(".")[0]
        if pa != pb and LAYER[pb] >= LAYER[pa]:
            out.append(f"{a}:{data['line']} ({pa}, layer {LAYER[pa]}) imports {b} ({pb}, layer {LAYER[pb]})")
    return sorted(out)


def cycles(g: nx.DiGraph) -> list[list[str]]:
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


@pytest.fixture(scope="module")
def graph() -> tuple[nx.DiGraph, list[str]]:
    return import_graph(project_sources())


def test_every_package_is_scanned(graph: tuple[nx.DiGraph, list[str]]) -> None:
    found = {m.split(".")[0] for m in graph[0].nodes}
    assert found == set(LAYER)
    assert {"cli.main", "planner.auto_search", "passes.manager", "hardware.profiles"} <= set(graph[0].nodes)


def test_layering_holds(graph: tuple[nx.DiGraph, list[str]]) -> None:
    assert violations(graph[0]) == []


def test_no_import_cycles(graph: tuple[nx.DiGraph, list[str]]) -> None:
    assert cycles(graph[0]) == []


def test_every_project_import_exists(graph: tuple[nx.DiGraph, list[str]]) -> None:
    assert graph[1] == []


def _with(extra: dict[str, str]) -> nx.DiGraph:
    return import_graph(project_sources() | extra)[0]


@pytest.mark.parametrize("module, source", [
    ("passes.bad", "from planner.auto import AutoPlan\n"),  # up two layers
    ("graphir.bad", "import passes.manager\n"),
    ("backends.bad", "def f():\n    from cli.main import main\n"),  # lazy, inside a function
    ("hardware.bad", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from reports import sweep\n"),
    ("reports.bad", "from graphir import ops\nfrom hardware.profiles import GPU\n"),  # a sibling layer
])
def test_a_forbidden_import_fails(module: str, source: str) -> None:
    bad = violations(_with({module: source}))
    assert len(bad) == 1 and bad[0].startswith(module + ":")


def test_an_allowed_import_passes() -> None:
    g = _with({"planner.good": "from passes.manager import run_pipeline\nfrom backends.costmodel import price\n"
                               "from . import auto\nfrom .auto import AutoPlan\n"})
    assert violations(g) == [] and g.has_edge("planner.good", "planner.auto")


def test_a_cycle_fails() -> None:
    g = _with({"passes.cyc_a": "from passes.cyc_b import x\n",
               "passes.cyc_b": "def f():\n    from passes import cyc_a\n"})
    assert cycles(g) == [["passes.cyc_a", "passes.cyc_b"]]


def test_a_missing_module_fails() -> None:
    _, missing = import_graph(project_sources() | {"cli.bad": "from graphir.cli_show import show\n"})
    assert missing == ["cli.bad:1 imports graphir.cli_show, which is no module of the project"]
