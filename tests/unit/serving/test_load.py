"""Bounded load, without Triton: the orchestrator's `max_in_flight` and the engines'
`max_queued_requests` answer overload at once with `UNAVAILABLE: overloaded: ...`.

Both bounds are reached deterministically: requests are started (or submitted) in one
synchronous run of code, before the loop lets any of them progress, or an engine's one
batch slot is held by a request that cannot finish before it is stopped and its queue by
another. The scenarios run on the pipeline and engine harnesses, which check afterwards
that no task, block or lease is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from orchestrator.routing.health import BreakerState
from orchestrator.serving.pipeline import Orchestrator
from orchestrator.serving.router import Phase, Router
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.contract import RequestType, parse_request
from orchestrator.wire.errors import ErrorCode, Overloaded, RequestError, is_overloaded
from tests import engine_harness as eh
from tests.pipeline_harness import (
    FREE,
    PROMPTS,
    Cluster,
    CollectingSink,
    RecordingResponseSink,
    client_tensors,
    oracle,
    run,
)

ORCH_IDLE = {"in_flight_requests": 0, "child_requests": 0, "stops_pending": 0, "queued_responses": 0}


def arrive(
    c: Cluster, rid: str, tensors: dict[str, np.ndarray]
) -> tuple[asyncio.Task[None] | None, RecordingResponseSink]:
    """A request as the orchestrator's model.py hands it over: started, or refused with its
    typed error on the client's sink (what the adapter does with any RequestError)."""
    sink = RecordingResponseSink(c.client)
    try:
        return c.orch.start(parse_request(tensors, {}, rid), tensors, sink), sink
    except RequestError as exc:
        sink.fail(exc)
        return None, sink


def stop_request(rid: str) -> Any:
    tensors = client_tensors("x", 1, streaming=False)
    tensors["stop"] = np.array([[True]])
    return parse_request(tensors, {}, rid)


def registry(c: Cluster) -> MemoryRegistry:
    reg = c.orch.telemetry.registry
    assert isinstance(reg, MemoryRegistry)
    return reg


# -- the orchestrator's max_in_flight ----------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_a_request_over_max_in_flight_is_refused_at_once_counted_and_logged(streaming: bool) -> None:
    """Two in flight at max_in_flight=2: the third is refused before it reaches any engine,
    counted as rejected and as outcome `overloaded`, logged, and holds nothing; the two
    finish exactly, after which a new request is admitted again."""

    async def body(c: Cluster) -> None:
        lines: list[str] = []
        c.orch.telemetry.request_log = lines.append
        tensors = client_tensors(PROMPTS["ascii"], 8, streaming=streaming, exclude=True)
        expected = await oracle(tensors)
        admitted = [arrive(c, f"a{i}", tensors) for i in range(2)]
        task, refused = arrive(c, "late", tensors)
        assert task is None
        error = refused.failed()
        assert error.code is ErrorCode.UNAVAILABLE and is_overloaded(error)
        assert "max_in_flight=2" in error.message and "retry later" in error.message
        assert set(c.orch.in_flight) == {"a0", "a1"}  # nothing kept for the refused one
        reg = registry(c)
        assert reg.value("disagg_orchestrator_rejected_total", reason="overloaded") == 1
        assert reg.value("disagg_requests_total", outcome="overloaded", streaming=str(streaming).lower()) == 1
        assert reg.observed("disagg_request_e2e_seconds") == []  # no latency for work never done
        assert [line for line in lines if "outcome=overloaded" in line] == [lines[0]] and "id=late" in lines[0]

        await asyncio.gather(*(t for t, _ in admitted if t is not None))
        for _, sink in admitted:
            sink.succeeded()
            assert sink.ids == expected
        assert len(c.client.calls) == 4, c.client.calls  # context + generation for each admitted one only
        again, sink = arrive(c, "again", tensors)
        assert again is not None
        await again
        assert sink.ids == expected
        assert reg.value("disagg_orchestrator_rejected_total", reason="overloaded") == 1
        assert c.orch.state() == ORCH_IDLE

    run(body, routing={"max_in_flight": 2})


def test_stop_is_never_refused_at_the_limit_and_frees_the_slot() -> None:
    """max_in_flight=1, its one request hanging in the generation phase: a new request is
    refused, the stop=true for the held one is not; it ends (empty final) and its slot is free."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 50, streaming=True)
        held_task, held = arrive(c, "held", tensors)
        assert held_task is not None
        await held.first.wait()  # the first token streamed: the request is on the engines
        _, refused = arrive(c, "late", tensors)
        assert is_overloaded(refused.failed())
        ack = RecordingResponseSink()
        assert c.orch.stop(stop_request("held"), ack)
        await held_task
        assert held.succeeded().ids == ()
        assert ack.succeeded().ids == ()
        assert c.orch.in_flight == {}
        again_task, again = arrive(c, "again", tensors)  # the slot is free again
        assert again_task is not None
        await again.first.wait()
        assert c.orch.stop(stop_request("again"), RecordingResponseSink())
        await again_task
        await c.orch.stops_answered()
        assert c.orch.state() == ORCH_IDLE
        assert registry(c).value("disagg_requests_total", outcome="stopped", streaming="true") == 2

    hang = replace(FREE, fault="hang", fault_phase="generation")
    run(body, routing={"max_in_flight": 1}, configs={"generation_0": hang, "generation_1": hang})


def test_max_in_flight_0_is_unlimited() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
        started = [arrive(c, f"r{i}", tensors) for i in range(40)]
        assert all(task is not None for task, _ in started)
        await asyncio.gather(*(task for task, _ in started if task is not None))
        for _, sink in started:
            sink.succeeded()

    run(body, routing={"max_in_flight": 0})


def test_each_orchestrator_instance_counts_its_own_requests() -> None:
    """Two instances (processes in Triton) over the same engines, max_in_flight=1 each: each
    admits one, and each refuses its own second."""

    async def body(c: Cluster) -> None:
        other = Orchestrator(c.orch.config, c.client, Router(c.orch.config))
        try:
            tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
            first, _ = arrive(c, "a", tensors)
            second = other.start(parse_request(tensors, {}, "b"), tensors, RecordingResponseSink())
            assert first is not None
            with pytest.raises(Overloaded, match="max_in_flight=1"):
                other.start(parse_request(tensors, {}, "c"), tensors, RecordingResponseSink())
            _, refused = arrive(c, "d", tensors)
            assert is_overloaded(refused.failed())
            await asyncio.gather(first, second)
        finally:
            await other.close()

    run(body, routing={"max_in_flight": 1})


# -- the engines' max_queued_requests ----------------------------------------------------------


def test_engine_refuses_beyond_max_queued_requests_and_counts_it() -> None:
    """Submitted before the loop runs, every request waits: two fit max_queued_requests=2, the
    next two are refused at once (UNAVAILABLE overloaded, counted); once the queue drained,
    requests are taken again, and a stop reaches a queued request at the limit."""

    async def body() -> None:
        core = eh.new_core(max_queued_requests=2, max_batch_size=1)
        await core.start()
        sinks = {rid: eh.RecordingSink(core, rid) for rid in ("a", "b", "c", "d")}
        core.submit(eh.request(eh.PROMPT, rid="a", max_tokens=4), sinks["a"])
        core.submit(eh.request(eh.PROMPT, rid="b", max_tokens=4), sinks["b"])
        assert core.waiting == 2
        for rid in ("c", "d"):
            with pytest.raises(Overloaded) as refused:
                core.submit(eh.request(eh.PROMPT, rid=rid, max_tokens=4), sinks[rid])
            assert refused.value.code is ErrorCode.UNAVAILABLE
            assert refused.value.message.startswith("overloaded: engine 'engine' has 2 requests waiting")
            assert "max_queued_requests=2" in refused.value.message
        assert core.waiting == 2 and core.active == 2  # nothing kept of the refused ones
        registry = core.telemetry.registry
        assert isinstance(registry, MemoryRegistry)
        assert registry.value("disagg_engine_rejected_total", engine="engine", reason="overloaded") == 2
        assert core.stop("b") == 1  # a stop is no submission: it reaches a queued request
        for rid in ("a", "b"):
            await sinks[rid].done.wait()
            sinks[rid].assert_well_formed()
        again = eh.RecordingSink(core, "e")
        core.submit(eh.request(eh.PROMPT, rid="e", max_tokens=4), again)
        await again.done.wait()
        again.assert_well_formed()
        assert registry.value("disagg_engine_rejected_total", engine="engine", reason="overloaded") == 2

    eh.run(body)


def test_running_requests_do_not_count_against_the_queue_bound() -> None:
    """max_batch_size=1, max_queued_requests=1: one runs and one waits; the next is refused,
    and once the runner finished, the waiter runs and a new request may wait again."""

    async def body() -> None:
        core = eh.new_core(max_queued_requests=1, max_batch_size=1)
        runner = await eh.submit(core, eh.request(eh.PROMPT, rid="run", max_tokens=200, streaming=True))
        await runner.first.wait()  # admitted: running, no longer waiting
        assert core.waiting == 0 and not runner.done.is_set()
        waiter = await eh.submit(core, eh.request(eh.PROMPT, rid="wait", max_tokens=4))
        with pytest.raises(Overloaded):
            core.submit(eh.request(eh.PROMPT, rid="over", max_tokens=4), eh.RecordingSink(core, "over"))
        await runner.done.wait()
        await waiter.done.wait()
        for sink in (runner, waiter):
            sink.assert_well_formed()

    eh.run(body)


def test_max_queued_requests_0_is_unlimited_and_negative_is_refused() -> None:
    async def body() -> None:
        core = eh.new_core(max_queued_requests=0, max_batch_size=1)
        await core.start()
        sinks = [eh.RecordingSink(core, f"r{i}") for i in range(600)]
        for i, sink in enumerate(sinks):
            core.submit(eh.request(eh.PROMPT, rid=f"r{i}", max_tokens=1), sink)
        assert core.waiting == 600
        for sink in sinks:
            await sink.done.wait()
            sink.assert_well_formed()

    eh.run(body)
    with pytest.raises(ValueError, match=r"'max_queued_requests' must be >= 0 \(0: unlimited\), got -1"):
        EngineConfig.from_parameters({"max_queued_requests": "-1"})
    assert EngineConfig.from_parameters({}).max_queued_requests == 512


# -- a full engine in the orchestrator's eyes ---------------------------------------------------

# One sequence at a time and one waiting. A blocker keeps the slot until it is stopped (50,000
# tokens at fault=slow's 20 ms a step: 1,000 s), a filler the queue: every further request
# is refused.
FULL_ABLE = replace(FREE, max_batch_size=1, max_queued_requests=1, fault_delay_ms=20.0)


async def fill(core: EngineCore) -> list[str]:
    """Make `core` full (see FULL_ABLE); returns the ids to stop to free it again."""
    await core.start()
    blocker = eh.request(eh.PROMPT, rid=f"{core.name}-blocker", max_tokens=50_000)
    core.submit(blocker, CollectingSink(), "slow")
    while not core.steps:  # the loop admits the blocker: it runs, the queue is empty
        await asyncio.sleep(0)
    core.submit(eh.request(eh.PROMPT, rid=f"{core.name}-filler", max_tokens=4), CollectingSink())
    assert core.waiting == 1 and core.active == 2
    return [blocker.request_id, f"{core.name}-filler"]


def empty(core: EngineCore, ids: list[str]) -> None:
    for rid in ids:
        assert core.stop(rid) == 1


def breaker_closed(c: Cluster, phase: Phase, engine: str) -> bool:
    state = c.orch.router.pools[phase].get(engine)
    assert state is not None
    return state.breaker.state is BreakerState.CLOSED and state.failures == 0 and state.breaker.trips == 0


@pytest.mark.parametrize("phase", [Phase.CONTEXT, Phase.GENERATION])
@pytest.mark.parametrize("streaming", [True, False])
def test_a_full_engine_sends_the_attempt_elsewhere_and_stays_healthy(phase: Phase, streaming: bool) -> None:
    """The first engine of the phase's pool is full: the attempt moves to the other engine and
    the request ends exactly as usual; the full engine's circuit breaker stays closed, with no
    failure counted (it is busy, not broken), so the next request may go to it at once."""
    first = f"{phase.value}_0"

    async def body(c: Cluster) -> None:
        prompt = " ".join([PROMPTS["ascii"]] * 8)  # several KV blocks: kv_aware has a preference
        tensors = client_tensors(prompt, 8, streaming=streaming, exclude=True)
        expected = await oracle(tensors)
        held = await fill(c.cores[first])
        task, sink = arrive(c, "r", tensors)
        assert task is not None
        await task
        sink.succeeded()
        assert sink.ids == expected
        kind = RequestType.CONTEXT_ONLY if phase is Phase.CONTEXT else RequestType.GENERATION_ONLY
        assert c.client.engines(kind.value) == [first, f"{phase.value}_1"]  # refused there, served by the other
        assert breaker_closed(c, phase, first)
        assert c.orch.router.pools[phase].get(first) in c.orch.router.pools[phase].eligible()
        assert registry(c).value("disagg_routing_retries_total", phase=phase.value) == 1
        core_registry = c.cores[first].telemetry.registry
        assert isinstance(core_registry, MemoryRegistry)
        assert core_registry.value("disagg_engine_rejected_total", engine=first, reason="overloaded") == 1
        empty(c.cores[first], held)

    # kv_aware would send the retry back to the engine it just routed the prompt to, unless the
    # full engine is excluded; a frozen clock keeps a wrongly opened breaker open.
    kv_aware = {"context_policy": "kv_aware", "generation_policy": "kv_aware"}
    run(body, configs={first: FULL_ABLE}, routing=kv_aware, clock=lambda: 0.0)


@pytest.mark.parametrize("streaming", [True, False])
def test_every_generation_engine_full_ends_in_one_overloaded_refusal(streaming: bool) -> None:
    """Both generation engines full: the request ends UNAVAILABLE `overloaded` (outcome
    overloaded, counted as engines_overloaded), its prefill's lease is stopped, no breaker
    opened; once the engines have room, the next request is served normally."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 8, streaming=streaming, exclude=True)
        held = {name: await fill(c.cores[name]) for name in ("generation_0", "generation_1")}
        task, sink = arrive(c, "r", tensors)
        assert task is not None
        await task
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and is_overloaded(error), error
        assert "max_queued_requests=1" in error.message
        reg = registry(c)
        assert reg.value("disagg_orchestrator_rejected_total", reason="engines_overloaded") == 1
        assert reg.value("disagg_requests_total", outcome="overloaded", streaming=str(streaming).lower()) == 1
        await c.orch.stops_answered()
        assert all(len(c.cores[name].leases) == 0 for name in ("context_0", "context_1"))  # stopped, not expired
        for name in ("generation_0", "generation_1"):
            assert breaker_closed(c, Phase.GENERATION, name)
            empty(c.cores[name], held[name])
        expected = await oracle(tensors)
        task, sink = arrive(c, "next", tensors)
        assert task is not None
        await task
        assert sink.ids == expected

    long_lease = replace(FREE, kv_lease_timeout_s=60.0)  # a lease gone in time was stopped, not expired
    configs = {"generation_0": FULL_ABLE, "generation_1": FULL_ABLE, "context_0": long_lease, "context_1": long_lease}
    run(body, configs=configs, clock=lambda: 0.0)
