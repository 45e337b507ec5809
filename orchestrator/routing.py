"""Routing policies: which engine of a pool serves a phase of a request.

A policy is a small object with `select(pool, request_id) -> engine`; it keeps its own
cursor or scores, while which engines exist stays with the caller. Policies are built by
name through `POLICIES`, so the orchestrator's config can say `context_policy: round_robin`
and an unknown name fails at model load listing the valid ones.
"""

from __future__ import annotations

import itertools
from typing import Callable, Protocol, Sequence


class RoutingPolicy(Protocol):
    name: str

    def select(self, pool: Sequence[str], request_id: str) -> str:
        """Pick one engine of a non-empty pool."""
        ...


class RoundRobin:
    """Each pool member in turn; the cursor counts picks, so pool changes stay fair."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, pool: Sequence[str], request_id: str) -> str:
        if not pool:
            raise ValueError("cannot route: the engine pool is empty")
        return pool[next(self._counter) % len(pool)]


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {RoundRobin.name: RoundRobin}


def make_policy(name: str, key: str = "policy") -> RoutingPolicy:
    """Build a policy by name; the error names the config key and the valid choices."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"{key}: unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return factory()
