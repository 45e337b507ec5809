"""An asyncio event loop whose clock is virtual: it jumps to the next timer when all wait.

Why: the engines and the orchestrator are asyncio code that sleeps for modelled GPU time
(`asyncio.sleep`, `call_later`, `wait_for` timeouts). On this loop those sleeps cost no
real time: when no callback is ready, the loop does not block in `select()` but moves
its clock straight to the earliest timer. Host work between two awaits takes zero
simulated time, so results do not depend on the machine that runs the simulation.

There is no I/O: nothing may open a socket or wait on a thread (a task waiting on
nothing while no timer is set is a deadlock, reported as `SimulationStalled`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


class SimulationStalled(RuntimeError):
    """Every task waits and no timer is set: nothing can ever happen again."""


class _Jump:
    """Stands where the selector would: `select(timeout)` advances the clock instead of waiting."""

    def __init__(self, loop: "VirtualTimeLoop") -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise SimulationStalled(
                f"at t={self._loop.time():.6f} s every task waits and no timer is set (a missing wake-up)"
            )
        self._loop.advance(timeout)
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """A loop for pure-asyncio code with no I/O; `time()` is simulated seconds from 0."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _Jump(self)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # call_soon_threadsafe: there are no other threads to wake us


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop (as `asyncio.run` does)."""
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
