"""The virtual-time loop: sleeps and timers cost no real time, order and durations are kept."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.sim.virtual_loop import SimulationStalled, VirtualTimeLoop, run


def test_an_hour_of_sleeps_takes_no_real_time_and_keeps_their_order() -> None:
    order: list[tuple[float, str]] = []

    async def sleeper(name: str, period: float, times: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(times):
            await asyncio.sleep(period)
            order.append((loop.time(), name))

    async def main() -> float:
        await asyncio.gather(sleeper("a", 1.5, 2400), sleeper("b", 2.0, 1800))
        return asyncio.get_running_loop().time()

    started = time.perf_counter()
    assert run(main()) == pytest.approx(3600.0)
    assert time.perf_counter() - started < 5.0, "virtual time must not wait in real time"
    assert [t for t, _ in order] == sorted(t for t, _ in order)
    assert order[:3] == [(pytest.approx(1.5), "a"), (pytest.approx(2.0), "b"), (pytest.approx(3.0), "a")]


def test_timeouts_fire_in_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=30.0)
        return loop.time()

    assert run(main()) == pytest.approx(30.0)


def test_waiting_on_nothing_is_reported_not_hung() -> None:
    async def main() -> None:
        await asyncio.Event().wait()  # nobody will ever set it, and no timer is pending

    with pytest.raises(SimulationStalled, match="every task waits and no timer is set"):
        run(main())


def test_the_clock_starts_at_zero_and_only_moves_forward() -> None:
    loop = VirtualTimeLoop()
    try:
        assert loop.time() == 0.0
        loop.advance(-5)
        assert loop.time() == 0.0
        loop.advance(2.5)
        assert loop.time() == 2.5
    finally:
        loop.close()
