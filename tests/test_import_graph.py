"""No import cycle among the files under src/ (srlora and srlora_lab), counting every import
statement: top-level, inside functions, and under ``if TYPE_CHECKING:``."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules under ``root`` it imports (every ast Import / ImportFrom node)."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [
                    f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods else base_name
                    for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # "srlora.x.y" where y is a name: the module x
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    out: list = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_nested_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n"
    )
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert cycles(import_graph(tmp_path)) == [["p.a", "p.b"]]


def test_no_import_cycle_under_src():
    edges = import_graph()
    assert "srlora.controller" in edges and "srlora.switch" in edges["srlora.controller"]
    assert cycles(edges) == []


def test_the_core_names_no_strategy_variant():
    """The controller and the switch reach the variants only through the registry."""
    edges = import_graph()
    for core in ("srlora.controller", "srlora.switch"):
        named = [
            m
            for m in edges[core]
            if m.startswith("srlora.strategies.")
            and m.rpartition(".")[2].split("_")[0]
            in ("selection", "insertion", "schedule", "exhaustion", "optimizer")
            and "_" in m.rpartition(".")[2]
        ]
        assert named == [], (core, named)
