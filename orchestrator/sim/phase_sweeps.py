"""Each phase alone on one engine, in virtual time: the inputs of rate matching at GPU scale.

The method is the one `disagg compare` runs against served stub engines (see
`orchestrator.bench.rate_matching`, whose points these sweeps return and whose
`context_capacity` reads them), here on symbolic engines of any tensor-parallel size:

- context: closed loops of `context_only` requests on one context engine; each finished
  prefill's lease is dropped at once (no generation engine pulls it). Per level: requests/s
  and TTFT p50 in steady state (`steady.py`). Capacity: the best rate whose TTFT p50 stays
  within a bound.
- generation: closed loops of whole requests on one engine whose prefill is free
  (`prefill_us_per_token` and `tp_comm_us_per_token` 0), so what is measured is decoding
  over contexts of the workload's length: tokens/s of the engine and tokens/s each user
  sees (1 / TPOT).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from typing import Sequence

import numpy as np

from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint
from orchestrator.bench.stats import RequestResult
from orchestrator.sim.cluster import SIM_SECRET, LocalTransport
from orchestrator.sim.steady import steady
from orchestrator.sim.virtual_loop import run
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import PREFILL_COST_KNOBS, EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.wire.contract import EngineOutput, EngineRequest, RequestType, SamplingParams
from orchestrator.wire.errors import RequestError
from orchestrator.wire.stop_condition import StopCondition


class _Done:
    """A sink that resolves when the request's final output (or error) arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[float] = loop.create_future()
        self.first_s: float | None = None
        self.loop = loop

    def send(self, output: EngineOutput, final: bool) -> None:
        if output.perf is not None and output.perf.first_token_time_ns and self.first_s is None:
            self.first_s = output.perf.first_token_time_ns / 1e9
        if final and not self.future.done():
            self.future.set_result(self.loop.time())

    def fail(self, error: RequestError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def cancelled(self) -> bool:
        return False


def _request(rid: str, isl: int, osl: int, kind: RequestType, rng: np.random.Generator) -> EngineRequest:
    ids = tuple(rng.integers(2, 32000, size=isl).tolist())
    return EngineRequest(request_id=rid, input_ids=ids, stop=StopCondition(max_new_tokens=osl), request_type=kind, sampling=SamplingParams(),
                         exclude_input_in_output=True, return_perf_metrics=True)  # fmt: skip


async def _closed_loop(
    core: EngineCore, users: int, count: int, isl: int, osl: int, kind: RequestType
) -> list[tuple[float, float, float]]:
    """(start, first token, end) of `count` requests sent by `users` closed-loop users."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng([isl, osl, users])
    ids = itertools.count()
    remaining = iter(range(count))
    times: list[tuple[float, float, float]] = []

    async def user(index: int) -> None:
        await asyncio.sleep(index * 0.001)
        for _ in remaining:
            rid = f"p{next(ids)}"
            sink = _Done(loop)
            start = loop.time()
            core.submit(_request(rid, isl, osl, kind, rng), sink)
            end = await sink.future
            if kind is RequestType.CONTEXT_ONLY:
                core.stop(rid)  # nobody will pull this prefill: drop its lease now
            times.append((start, sink.first_s if sink.first_s is not None else end, end))

    await asyncio.gather(*(user(i) for i in range(users)))
    return times


def _results(times: Sequence[tuple[float, float, float]], isl: int, osl: int) -> list[RequestResult]:
    return [
        RequestResult(f"p{i}", start, first - start, (), end - start, isl, osl)
        for i, (start, first, end) in enumerate(times)
    ]


def _engine(config: EngineConfig) -> EngineCore:
    loop = asyncio.get_running_loop()
    return EngineCore("probe", config, transport=LocalTransport({}), clock=EngineClock.of_loop(loop),
                      keys=SIM_SECRET, symbolic=True)  # fmt: skip


def _requests_for(users: int) -> int:
    return max(64, 6 * users)


def context_sweep(config: EngineConfig, isl: int, levels: Sequence[int]) -> list[ContextPoint]:
    """One context engine of `config` at each closed-loop concurrency."""

    async def main() -> list[ContextPoint]:
        out = []
        for users in levels:
            core = _engine(config)
            await core.start()
            try:
                times = await _closed_loop(core, users, _requests_for(users), isl, 1, RequestType.CONTEXT_ONLY)
            finally:
                await core.close()
            st = steady(_results(times, isl, 1), users)
            out.append(ContextPoint(users, st.requests_per_s, st.ttft_p50_s or 0.0))  # TTFT p50
        return out

    return run(main())


def generation_sweep(config: EngineConfig, isl: int, osl: int, levels: Sequence[int]) -> list[GenerationPoint]:
    """One generation engine of `config` (its prefill made free) at each closed-loop concurrency."""
    # A generation-only engine spends no token budget on prompts (its KV arrives pulled): the
    # probe's budget must not either, or long prompts would be admitted one at a time.
    free = dict.fromkeys(PREFILL_COST_KNOBS, 0.0)
    free_prefill = replace(config, **free, max_batch_size=max(levels), max_num_tokens=isl * max(levels) + max(levels))  # type: ignore[arg-type]

    async def main() -> list[GenerationPoint]:
        out = []
        for users in levels:
            core = _engine(free_prefill)
            try:
                times = await _closed_loop(core, users, _requests_for(users), isl, osl, RequestType.AGGREGATE)
            finally:
                await core.close()
            st = steady(_results(times, isl, osl), users)
            out.append(GenerationPoint(users, st.tokens_per_s, st.tokens_per_s_per_user))
        return out

    return run(main())
