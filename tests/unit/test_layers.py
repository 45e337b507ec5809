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
    "tools": {"wire", "text", "telemetry", "runtime", "clients", "routing", "serving", "stub_engine", "ops", "bench"},
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
