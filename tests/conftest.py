"""Shared fixtures: one real tritonserver on the committed model repository per session."""

from __future__ import annotations

from typing import Iterator

import pytest

from orchestrator.tools.launch import DEFAULT_REPOSITORY, TritonServer


@pytest.fixture(scope="session")
def server() -> Iterator[TritonServer]:
    with TritonServer(model_repository=DEFAULT_REPOSITORY) as srv:
        yield srv
