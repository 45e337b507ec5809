"""A symbolic engine (the simulator's) schedules exactly as the real stub engine: same steps,
same batches, same times; only the K/V data and the token values differ."""

from __future__ import annotations

import asyncio
import random

from orchestrator.sim.virtual_loop import run
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.wire.contract import EngineOutput
from orchestrator.wire.errors import RequestError
from tests.engine_harness import TEST_KEYS, request

CONFIG = EngineConfig(max_batch_size=4, max_num_tokens=512, max_tokens_in_paged_kv_cache=2048, tokens_per_block=16)


class Times:
    """A sink that keeps when (virtual seconds) each output arrived and how many tokens it had."""

    def __init__(self) -> None:
        self.events: list[tuple[float, int, bool]] = []

    def send(self, output: EngineOutput, final: bool) -> None:
        self.events.append((asyncio.get_running_loop().time(), len(output.tokens), final))

    def fail(self, error: RequestError) -> None:
        raise AssertionError(f"unexpected error {error}")

    def cancelled(self) -> bool:
        return False


def serve(symbolic: bool) -> tuple[list[tuple[int, int, int]], list[list[tuple[float, int, bool]]]]:
    async def main() -> tuple[list[tuple[int, int, int]], list[list[tuple[float, int, bool]]]]:
        loop = asyncio.get_running_loop()
        transport = object() if symbolic else None  # a symbolic engine needs one; these requests never pull
        core = EngineCore("e", CONFIG, transport=transport, clock=EngineClock.of_loop(loop), keys=TEST_KEYS,  # type: ignore[arg-type]
                          symbolic=symbolic)  # fmt: skip
        rng = random.Random(5)
        sinks = []
        try:
            for i in range(12):  # arrivals spread out, prompts of every size up to past max_num_tokens/2
                await asyncio.sleep(rng.random() * 0.02)
                ids = [rng.randrange(2, 200) for _ in range(rng.randint(5, 400))]
                sink = Times()
                core.submit(request(ids, rid=f"r{i}", max_tokens=rng.randint(1, 40), streaming=True), sink)
                sinks.append(sink)
            await core.wait_idle()
            core.check_idle()
            return list(core.step_log), [s.events for s in sinks]
        finally:
            await core.close()

    return run(main())


def test_the_symbolic_engine_takes_the_same_steps_at_the_same_times() -> None:
    real_steps, real_times = serve(symbolic=False)
    sim_steps, sim_times = serve(symbolic=True)
    assert len(real_steps) > 20
    assert sim_steps == real_steps
    assert sim_times == real_times  # every output at the same virtual time with as many tokens
