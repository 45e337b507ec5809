"""Engine pools: who is a member, how loaded and how healthy each engine is.

State only; choosing among the members is `orchestrator.routing.policies`'s job, and the two meet
in `orchestrator.serving.router`. Membership can change while serving (`update`): a removed
engine stops getting new work at once, while requests already on it run to their end and
still release its load counters (the state object stays reachable from their decision).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from orchestrator.clients.endpoints import Endpoint, parse_endpoint
from orchestrator.routing.health import BreakerSettings, CircuitBreaker
from orchestrator.routing.prefix_index import PrefixIndex


@dataclass(slots=True)
class EngineState:
    """One engine as the router sees it."""

    endpoint: Endpoint
    breaker: CircuitBreaker
    index: PrefixIndex
    in_flight: int = 0
    in_flight_tokens: int = 0
    routed: int = 0
    failures: int = 0
    ready: bool = True  # the last readiness probe's answer
    member: bool = True  # False once removed from its pool

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def healthy(self) -> bool:
        return self.ready and self.breaker.available()


@dataclass
class EnginePool:
    phase: str
    breaker_settings: BreakerSettings
    index_blocks: int
    clock: Callable[[], float] = time.monotonic
    _members: dict[str, EngineState] = field(default_factory=dict)

    @classmethod
    def of(cls, phase: str, names: Iterable[str], breaker: BreakerSettings, index_blocks: int,
           clock: Callable[[], float] = time.monotonic) -> "EnginePool":  # fmt: skip
        pool = cls(phase, breaker, index_blocks, clock)
        pool.update(names)
        return pool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    @property
    def members(self) -> tuple[EngineState, ...]:
        return tuple(self._members.values())

    def get(self, name: str) -> EngineState | None:
        return self._members.get(name)

    def update(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the membership exactly `names` (order kept); returns (added, removed).

        Engines that stay keep their load, health and prefix index.
        """
        wanted = list(dict.fromkeys(names))
        removed = [n for n in self._members if n not in wanted]
        for name in removed:
            self._members.pop(name).member = False
        added = [n for n in wanted if n not in self._members]
        old = self._members
        self._members = {}
        for name in wanted:
            self._members[name] = old.get(name) or EngineState(
                endpoint=parse_endpoint(name),
                breaker=CircuitBreaker(self.breaker_settings, self.clock),
                index=PrefixIndex(self.index_blocks),
            )
        return added, removed

    def eligible(self, exclude: Sequence[str] = ()) -> list[EngineState]:
        """Healthy members not in `exclude`; when none is healthy, every member not excluded.

        The fallback is deliberate: with the whole pool marked unhealthy, trying an engine
        costs one fast failure, while refusing would fail every request for a backoff.
        """
        others = [s for s in self._members.values() if s.name not in exclude]
        return [s for s in others if s.healthy] or others
