"""Engine health: a circuit breaker per engine, so a failing engine is skipped, then probed back.

    closed --failure x threshold--> open (skipped for `backoff`) --backoff over--> half-open
    half-open --success--> closed            half-open --failure--> open, backoff doubled

A half-open engine takes traffic again: the next request it serves decides. A readiness
probe (`orchestrator.serving.membership`) can shorten nothing but it can re-open a half-open engine
that says it is not ready, so an unloaded model is not tried by a client's request. The
clock is injected so tests step time exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """`failure_threshold` consecutive failures open the breaker for `backoff_s`, doubling to `backoff_max_s`."""

    failure_threshold: int = 1
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


class CircuitBreaker:
    """One engine's health; only the router's loop touches it."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.trips = 0  # how many times it opened (a metric)
        self._backoff = settings.backoff_s
        self.retry_at = 0.0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self.retry_at:
            self._state = BreakerState.HALF_OPEN
        return self._state

    def available(self) -> bool:
        """Whether the engine may take a request now (closed, or half-open for a trial)."""
        return self.state is not BreakerState.OPEN

    def success(self) -> None:
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._backoff = self.settings.backoff_s

    def failure(self) -> bool:
        """Count a failure; returns True when this one opened the breaker."""
        state = self.state
        self.consecutive_failures += 1
        if state is BreakerState.OPEN:
            return False  # a request routed before it opened failed too: already skipped
        if state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.settings.failure_threshold:
            if state is BreakerState.HALF_OPEN:
                self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
            self._open()
            return True
        return False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self.trips += 1
        self.retry_at = self._clock() + self._backoff
