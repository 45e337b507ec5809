"""The package's layers (orchestrator/__init__.py): every import points down or sideways
within a layer, never up, and `serving` and `stub_engine` never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
# Each subpackage and the subpackages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "text": {"wire"},
    "telemetry": {"wire"},
    "runtime": {"wire", "telemetry"},
    "clients": {"wire", "runtime"},
    "routing": {"wire", "clients"},
    "serving": {"wire", "text", "telemetry", "runtime", "clients", "routing"},
    "stub_engine": {"wire", "telemetry", "runtime"},
    "ops": {"wire", "text", "telemetry", "runtime", "clients", "routing", "serving", "stub_engine"},
    "bench": {"wire", "text"},
    "frontend": {"wire", "text"},
    "sim": {"wire", "text", "telemetry", "runtime", "clients", "routing", "serving", "stub_engine", "ops", "bench"},
    "tools": {
        "wire",
        "text",
        "telemetry",
        "runtime",
        "clients",
        "routing",
        "serving",
        "stub_engine",
        "ops",
        "bench",
        "frontend",
        "sim",
    },  # fmt: skip
}


def imports_of(path: Path) -> set[str]:
    """The orchestrator subpackages a module imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in getattr(node, "names", [])]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "orchestrator" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_lives_in_a_layer() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "put each module in the subpackage of its concern (orchestrator/__init__.py)"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ALLOWED)


def test_imports_point_only_down() -> None:
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for target in imports_of(path) - allowed - {layer}:
                wrong.append(f"{path.relative_to(PACKAGE)} imports orchestrator.{target}")
    assert wrong == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from orchestrator.serving.pipeline import Orchestrator\n")
    assert imports_of(module) == {"serving"}


def module_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports at its top level."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        targets: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # top level only: a call-time import cannot cycle at import
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator"):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("orchestrator"))
        graph[name] = targets
    return {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
