"""Shared fixtures: one real tritonserver on the committed model repository per session.

Layout: tests/unit/<subpackage>/ mirrors orchestrator/ (no server, seconds); tests/e2e/
starts real tritonservers and is marked `e2e` here (`pytest -m "not e2e"` skips them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.tools.launch import DEFAULT_REPOSITORY, TritonServer

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def server() -> Iterator[TritonServer]:
    with TritonServer(model_repository=DEFAULT_REPOSITORY) as srv:
        yield srv
