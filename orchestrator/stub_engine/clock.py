"""Where an engine reads the time, so the same scheduler runs in real or virtual time.

Under Triton an engine stamps its outputs with the host's wall clock and counts the host
work of a step (its real CPU time) toward the step's modelled GPU time. In the simulator
(`orchestrator.sim`) the asyncio loop's clock is virtual: sleeps, timers and these two
readings all come from it, and host work takes no simulated time at all, so a run's
timings depend on the cost model alone, not on how fast the machine simulating it is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class EngineClock:
    """`now_ns`: wall-clock stamps (perf metrics, handoff expiry); `elapsed_s`: a monotonic
    reading that measures host work against the cost model."""

    now_ns: Callable[[], int] = time.time_ns
    elapsed_s: Callable[[], float] = time.perf_counter

    @classmethod
    def of_loop(cls, loop: asyncio.AbstractEventLoop) -> "EngineClock":
        """Both readings from `loop.time()` (a virtual-time loop: host work costs nothing)."""
        return cls(now_ns=lambda: int(loop.time() * 1e9), elapsed_s=loop.time)
