"""Every request ends exactly once and leaves nothing behind: stop, client cancellation,
timeouts, duplicate ids and each injected engine fault, through the real Orchestrator over
real EngineCores (no Triton). `run` checks afterwards that the orchestrator holds no task
and every engine gave back every block and lease; tests that must prove a prompt release
(not the lease timeout's) use long lease timeouts and look at engine state right away."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.contract import parse_request
from orchestrator.wire.errors import DuplicateRequest, ErrorCode, InvalidInput
from tests.pipeline_harness import PROMPTS, Cluster, RecordingResponseSink, client_tensors, oracle, run

IDLE = {"active_requests": 0, "leases": 0, "kv_blocks_in_use": 0, "kv_blocks_reserved": 0}
ORCH_IDLE = {"in_flight_requests": 0, "child_requests": 0, "stops_pending": 0, "queued_responses": 0}
LONG_LEASE = EngineConfig.free(kv_lease_timeout_s=60.0)


def engine(lease_s: float = 60.0, **faults: Any) -> EngineConfig:
    """A zero-cost engine; with long leases only a stop frees an unpulled prefill in time."""
    return EngineConfig.free(kv_lease_timeout_s=lease_s, **faults)


def long_lease(**overrides: EngineConfig) -> dict[str, EngineConfig]:
    names = ("context_0", "context_1", "generation_0", "generation_1")
    return {name: overrides.get(name, LONG_LEASE) for name in names}


def start(
    c: Cluster, prompt: str, max_tokens: int, rid: str, streaming: bool = True
) -> tuple[asyncio.Task[None], RecordingResponseSink]:
    tensors = client_tensors(prompt, max_tokens, streaming=streaming)
    sink = RecordingResponseSink(c.client)
    return c.orch.start(parse_request(tensors, {}, rid), tensors, sink), sink


async def released(c: Cluster) -> None:
    """After the stops are answered, engines and orchestrator hold nothing (no lease timeout needed)."""
    await c.orch.stops_answered()
    for core in c.cores.values():
        assert core.state() == IDLE, (core.name, core.state())
    assert c.orch.state() == ORCH_IDLE


class StopSink(RecordingResponseSink):
    """The response channel of a stop request itself."""


def stop_request(rid: str) -> Any:
    tensors = client_tensors("x", 1, streaming=False)
    tensors["stop"] = np.array([[True]])
    return parse_request(tensors, {}, rid)


# -- stop=true ------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_in_the_generation_phase_ends_with_an_empty_final_response_and_frees_kv(streaming: bool) -> None:
    async def body(c: Cluster) -> None:
        task, sink = start(c, PROMPTS["ascii"], 3000, "victim", streaming)
        gen_cores = [c.cores["generation_0"], c.cores["generation_1"]]
        while not any(core.steps > 3 for core in gen_cores):
            await asyncio.sleep(0.001)
        ack = StopSink()
        assert c.orch.stop(stop_request("victim"), ack)
        await task
        last = sink.succeeded()
        if streaming:
            assert last.ids == ()  # the empty final response
        else:
            prompt = len(client_tensors(PROMPTS["ascii"], 1, streaming=False)["input_ids"].reshape(-1))
            assert 0 < len(last.ids) - prompt < 3000  # prompt + what it had generated
        ack.succeeded()
        assert ack.responses[0].ids == ()
        await released(c)
        assert c.orch.child_stops.sent >= 1

    run(body, configs=long_lease())


def test_stop_while_the_kv_waits_to_be_pulled_drops_the_lease_at_once() -> None:
    """Generation engines hang before pulling: the prefill's lease is the only thing held on the
    context engine, which no cancellation reaches; the stop for the context child frees it."""

    async def body(c: Cluster) -> None:
        task, sink = start(c, PROMPTS["ascii"], 50, "waiting")
        await sink.first.wait()  # the first token came from the finished context phase
        while not any(len(core.leases) for core in c.cores.values()):
            await asyncio.sleep(0.001)
        c.orch.stop(stop_request("waiting"), StopSink())
        await task
        sink.succeeded()
        await released(c)

    hang = engine(fault="hang")
    run(body, configs=long_lease(generation_0=hang, generation_1=hang))


def test_stop_during_a_hung_context_phase_frees_the_context_engine() -> None:
    async def body(c: Cluster) -> None:
        task, sink = start(c, PROMPTS["ascii"], 50, "early")
        while not c.cores["context_0"].active and not c.cores["context_1"].active:
            await asyncio.sleep(0.001)
        c.orch.stop(stop_request("early"), StopSink())
        await task
        assert sink.succeeded().ids == ()
        await released(c)

    hang = engine(fault="hang")
    run(body, configs=long_lease(context_0=hang, context_1=hang))


def test_stop_of_an_unknown_or_finished_id_is_answered_and_changes_nothing() -> None:
    async def body(c: Cluster) -> None:
        done = await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=True), "finished")
        done.succeeded()
        for rid in ("finished", "never-sent"):
            ack = StopSink()
            assert c.orch.stop(stop_request(rid), ack) is False
            ack.succeeded()
        with pytest.raises(InvalidInput, match="needs the id of the request to stop"):
            c.orch.stop(stop_request(""), StopSink())

    run(body)


def test_duplicate_in_flight_request_id_is_refused_and_the_first_is_untouched() -> None:
    async def body(c: Cluster) -> None:
        task, sink = start(c, PROMPTS["ascii"], 8, "same")
        with pytest.raises(DuplicateRequest, match="'same' is already in flight") as info:
            start(c, PROMPTS["emoji"], 8, "same")
        assert info.value.code is ErrorCode.ALREADY_EXISTS
        await task
        sink.succeeded()
        again, sink2 = start(c, PROMPTS["emoji"], 4, "same")  # reusable once it has ended
        await again
        sink2.succeeded()

    run(body)


# -- client cancellation --------------------------------------------------------------------


class CancellingSink(RecordingResponseSink):
    """A client that cancels (as Triton's request.is_cancelled() reports) after `after` responses."""

    def __init__(self, after: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.after = after

    def cancelled(self) -> bool:
        return len(self.calls) >= self.after


@pytest.mark.parametrize("after", [0, 1, 5])
def test_client_cancellation_ends_cancelled_and_stops_the_children(after: int) -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 3000, streaming=True)
        sink = CancellingSink(after, client=c.client)
        await c.orch.start(parse_request(tensors, {}, "gone"), tensors, sink)
        error = sink.failed()
        assert error.code is ErrorCode.CANCELLED and "cancelled by the client" in error.message
        assert c.orch.cancelled_by_client == 1
        await released(c)

    slow_decode = EngineConfig.free(kv_lease_timeout_s=60.0, decode_ms_per_step=1.0)
    run(body, configs=long_lease(generation_0=slow_decode, generation_1=slow_decode), routing={"cancel_check_ms": 5})


def test_cancellation_polls_in_turn_and_reaches_every_request() -> None:
    """One poll per interval (cancel_checks_per_tick=1) still finds all five cancellations."""

    async def body(c: Cluster) -> None:
        runs = []
        for i in range(5):
            tensors = client_tensors(PROMPTS["ascii"], 3000, streaming=True)
            sink = CancellingSink(after=0, client=c.client)
            runs.append((c.orch.start(parse_request(tensors, {}, f"t{i}"), tensors, sink), sink))
        await asyncio.gather(*(task for task, _ in runs))
        assert all(sink.failed().code is ErrorCode.CANCELLED for _, sink in runs)
        assert c.orch.cancelled_by_client == 5
        await released(c)

    slow_decode = EngineConfig.free(kv_lease_timeout_s=60.0, decode_ms_per_step=1.0)
    configs = long_lease(generation_0=slow_decode, generation_1=slow_decode)
    run(body, configs=configs, routing={"cancel_check_ms": 2, "cancel_checks_per_tick": 1})


# -- timeouts -------------------------------------------------------------------------------


def test_request_deadline_ends_unavailable_and_engines_drop_the_work() -> None:
    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 20, streaming=True), "late")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE
        assert "request_timeout_s=0.2" in error.message and "generation phase" in error.message
        await released(c)

    hang = engine(fault="hang")
    run(body, configs=long_lease(generation_0=hang, generation_1=hang), routing={"request_timeout_s": 0.2})


@pytest.mark.parametrize("phase", ["context", "generation"])
def test_phase_timeout_moves_the_attempt_to_another_engine(phase: str) -> None:
    """The slow engine overruns the phase timeout; the retry on the other engine succeeds."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 6, streaming=False)
        sink = await c.serve(tensors, "slowpoke")
        sink.succeeded()
        assert sink.ids[-6:] == await oracle(tensors)
        failures = {state.name: state.failures for state in c.orch.router.engines()}
        assert failures[f"{phase}_0"] == 1 and failures[f"{phase}_1"] == 0
        await released(c)

    slow = engine(fault="slow", fault_delay_ms=2000.0)
    routing = {f"{phase}_timeout_s": 0.1, f"{phase}_policy": "round_robin"}
    run(body, configs=long_lease(**{f"{phase}_0": slow}), routing=routing)


# -- injected faults through the orchestrator -----------------------------------------------


@pytest.mark.parametrize("max_migrations", [1, 0])
@pytest.mark.parametrize("streaming", [True, False])
def test_crash_mid_generation_is_retried_or_migrated(streaming: bool, max_migrations: int) -> None:
    """Not streaming, nothing reached the client: a plain retry. Streaming, tokens did: the
    request migrates (or, with max_migrations=0, ends in one clean UNAVAILABLE)."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 12, streaming=streaming)
        sink = await c.serve(tensors, "crashy")
        if streaming and not max_migrations:
            error = sink.failed()
            assert error.code is ErrorCode.UNAVAILABLE and "crashed mid-stream" in error.message
            assert "not retried" in error.message
        else:
            sink.succeeded()
            assert sink.ids[-12:] == await oracle(tensors)
        await released(c)

    crash = engine(fault="crash", fault_after_tokens=3)
    routing = {"generation_policy": "round_robin", "max_migrations": max_migrations}
    run(body, configs=long_lease(generation_0=crash), routing=routing)


@pytest.mark.parametrize("ending", ["stop", "client", "request_timeout", "phase_timeout"])
def test_ending_a_request_during_its_migration_frees_everything(ending: str) -> None:
    """generation_0 crashes mid-stream and the continuation's generation engine hangs (its KV
    lease on the context engine stays unpulled, its child open): a stop, a client's
    cancellation or a timeout ends the request once, and engines hold nothing afterwards,
    without waiting for a lease timeout."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["cjk"], 40, streaming=True)
        expected = await oracle(tensors)
        after = 4 if ending == "client" else 1000  # 3 tokens from generation_0, then the continuation's first
        sink = CancellingSink(after, client=c.client)
        task = c.orch.start(parse_request(tensors, {}, "moving"), tensors, sink)
        if ending == "stop":

            async def reached() -> None:  # the continuation reached the hanging engine
                while not c.cores["generation_1"].active:
                    await asyncio.sleep(0.001)

            await asyncio.wait_for(reached(), 10)
            assert any(len(c.cores[n].leases) for n in ("context_0", "context_1"))
            c.orch.stop(stop_request("moving"), StopSink())
        await task
        last = sink.terminal()
        registry = c.orch.telemetry.registry
        assert isinstance(registry, MemoryRegistry)
        if ending == "stop":
            assert last.error is None and last.ids == ()
            assert registry.value("disagg_orchestrator_migrations_total", engine="generation_0", outcome="stopped") == 1
        elif ending == "client":
            assert last.error is not None and last.error.code is ErrorCode.CANCELLED
            assert (
                registry.value("disagg_orchestrator_migrations_total", engine="generation_0", outcome="cancelled") == 1
            )
        elif ending == "request_timeout":
            assert last.error is not None and "request timed out" in last.error.message
        else:
            assert last.error is not None and last.error.code is ErrorCode.UNAVAILABLE
            assert (
                "migration 1 of max_migrations=1 failed: generation phase timed out on engine 'generation_1'"
                in last.error.message
            )
        assert sink.ids == expected[: len(sink.ids)] and len(sink.ids) >= 3
        await released(c)

    crash = engine(fault="crash", fault_after_tokens=3, fault_phase="generation")
    routing: dict[str, Any] = {"generation_policy": "round_robin", "breaker_failures": 1000, "cancel_check_ms": 5}
    if ending == "request_timeout":
        routing["request_timeout_s"] = 1.0
    if ending == "phase_timeout":
        routing["generation_timeout_s"] = 0.5
    run(body, configs=long_lease(generation_0=crash, generation_1=engine(fault="hang")), routing=routing)


def test_crashing_context_engine_is_retried_on_the_other() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["multibyte"], 8, streaming=True)
        sink = await c.serve(tensors, "ctxcrash")
        sink.succeeded()
        assert sink.ids == await oracle(tensors)
        await released(c)

    run(body, configs=long_lease(context_0=engine(fault="crash")), routing={"context_policy": "round_robin"})


def test_dropped_lease_reruns_the_context_phase() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["cjk"], 8, streaming=True)
        sink = await c.serve(tensors, "dropped")
        sink.succeeded()
        assert sink.ids == await oracle(tensors)
        assert c.cores["context_0"].leases.dropped == 1
        await released(c)

    run(body, configs=long_lease(context_0=engine(fault="drop_lease")), routing={"context_policy": "round_robin"})


def test_every_lease_dropped_ends_in_one_unavailable() -> None:
    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 8, streaming=True), "nolease")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "KV cache was lost" in error.message
        await released(c)

    drop = engine(fault="drop_lease")
    run(body, configs=long_lease(context_0=drop, context_1=drop))


# -- no leaks after a mix of everything -----------------------------------------------------


def test_no_leaks_after_a_mix_of_success_errors_stops_cancels_and_timeouts() -> None:
    """60 concurrent requests over engines with sampled faults; a tenth stopped, a tenth
    cancelled by their clients. Each ends exactly once; afterwards nothing is held anywhere."""
    rng = random.Random(7)

    async def body(c: Cluster) -> None:
        prompts = list(PROMPTS.values())
        runs: list[tuple[asyncio.Task[None], RecordingResponseSink]] = []
        for i in range(60):
            tensors = client_tensors(rng.choice(prompts), rng.choice([1, 4, 40, 400]), streaming=rng.random() < 0.5)
            kind = i % 10
            sink = CancellingSink(after=1, client=c.client) if kind == 1 else RecordingResponseSink(c.client)
            runs.append((c.orch.start(parse_request(tensors, {}, f"m{i}"), tensors, sink), sink))
        await asyncio.sleep(0)
        for i in range(0, 60, 10):
            c.orch.stop(stop_request(f"m{i}"), StopSink())
        await asyncio.gather(*(task for task, _ in runs))
        codes = [s.terminal().error.code if s.terminal().error else None for _, s in runs]
        assert all(code in (None, ErrorCode.UNAVAILABLE, ErrorCode.CANCELLED) for code in codes), codes
        assert codes.count(None) >= 30
        await c.orch.stops_answered()
        assert c.orch.state() == ORCH_IDLE

    faulty = {  # short leases: whatever a stop missed would expire before run()'s leak check
        "context_0": engine(1.0, fault="crash", fault_rate=0.3),
        "context_1": engine(1.0, fault="drop_lease", fault_rate=0.3),
        "generation_0": engine(1.0, fault="hang", fault_rate=0.2, decode_ms_per_step=0.5),
        "generation_1": engine(1.0, fault="slow", fault_rate=0.3, fault_delay_ms=20.0),
    }
    run(body, configs=faulty, routing={"engine_timeout_s": 0.3, "cancel_check_ms": 5, "request_timeout_s": 5.0})


@pytest.mark.parametrize("ending", ["stop", "client", "shutdown"])
def test_a_request_ended_before_its_task_ever_ran_still_gets_its_one_final_response(ending: str) -> None:
    """A stop right behind its request cancels the task before its first step, where no code of
    the request runs; the task's done-callback answers instead (found by the soak: a hang)."""

    async def body(c: Cluster) -> None:
        task, sink = start(c, PROMPTS["ascii"], 1, "instant", streaming=True)
        if ending == "stop":
            c.orch.stop(stop_request("instant"), StopSink())
        elif ending == "client":
            c.orch.in_flight["instant"].progress.ending = "client"
            task.cancel()
        else:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        last = sink.terminal()
        if ending == "stop":
            assert last.error is None and last.ids == ()
        else:
            assert last.error is not None and last.error.code is ErrorCode.CANCELLED
        assert c.orch.state() == ORCH_IDLE

    run(body)
