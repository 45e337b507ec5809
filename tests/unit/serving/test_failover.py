"""Routing through the real pipeline and real engines (no Triton): failover, request
migration, conditional disaggregation, KV-aware reuse, live membership. Faults are the stub
engine's own (`fault=fail|stall|crash`) or a real lease taken away; every scenario ends with
the harness's no-leak check (no task, every block and lease back on every engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.clients.engine_client import EngineClient, EngineReply
from orchestrator.routing.health import BreakerState
from orchestrator.serving.migration import continuation_tensors
from orchestrator.serving.router import Phase
from orchestrator.stub_engine.core import EngineCore
from orchestrator.text.detokenize import completion_text
from orchestrator.wire.contract import EngineOutput, parse_request
from orchestrator.wire.errors import ErrorCode, RequestError
from orchestrator.wire.stop_condition import build_word_list
from tests.pipeline_harness import (
    FREE,
    PROMPTS,
    SAMPLED,
    TOK,
    Cluster,
    CollectingSink,
    RecordingResponseSink,
    Tensors,
    assert_same_text,
    client_tensors,
    oracle,
    prompt_ids,
    run,
)

CTX, GEN = "context_only", "generation_only"
LOCAL = "None"  # request_type of a request that runs both phases on one engine
LONG = "the quick brown fox jumps over the lazy dog while the cat sat on the mat; " * 5  # ~375 tokens
FAIL = FREE.__class__.free(kv_lease_timeout_s=0.5, fault="fail")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def serve_ok(c: Cluster, tensors: Tensors, rid: str = "") -> tuple[int, ...]:
    sink = await c.serve(tensors, rid)
    sink.succeeded()
    return sink.ids


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    """Wait for a background task's effect, bounded (fails the test instead of hanging)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


# -- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_failing_context_engine_is_retried_then_skipped(streaming: bool) -> None:
    """context_1 fails every request: each request still succeeds (retried on context_0), and
    after its first failure context_1 is skipped for the backoff."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 6, streaming=streaming)
        expected = await oracle(tensors)
        for i in range(6):
            ids = await serve_ok(c, tensors, f"r{i}")
            assert ids[-len(expected) :] == expected
        assert c.client.engines(CTX) == [
            "context_0",
            "context_1",
            "context_0",
            "context_0",
            "context_0",
            "context_0",
            "context_0",
        ]
        state = c.orch.router.pools[Phase.CONTEXT].get("context_1")
        assert state is not None and state.breaker.state is BreakerState.OPEN and state.failures == 1
        assert c.orch.router.retries["context"] == 1

    run(body, configs={"context_1": FAIL}, routing={"breaker_backoff_s": 60, "breaker_backoff_max_s": 60})


def test_skipped_engine_recovers_after_its_backoff() -> None:
    """Once the backoff is over the engine gets a trial request; served well, it is back in rotation."""
    clock = Clock()

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
        for i in range(3):
            await serve_ok(c, tensors, f"a{i}")
        assert c.client.engines(CTX).count("context_1") == 1
        healthy = EngineCore("context_1", FREE)  # the operator fixed and restarted it
        broken = c.cores["context_1"]
        c.cores["context_1"] = healthy
        inner = c.client.inner
        assert hasattr(inner, "engines")
        inner.engines["context_1"] = healthy
        await broken.close()
        clock.now += 10.0
        for i in range(4):
            await serve_ok(c, tensors, f"b{i}")
        assert c.client.engines(CTX)[-4:].count("context_1") == 2  # round robin again
        state = c.orch.router.pools[Phase.CONTEXT].get("context_1")
        assert state is not None and state.breaker.state is BreakerState.CLOSED

    run(body, configs={"context_1": FAIL}, routing={"breaker_backoff_s": 10, "breaker_backoff_max_s": 10}, clock=clock)


@pytest.mark.parametrize("streaming", [False, True])
def test_generation_failure_before_any_token_is_retried_elsewhere(streaming: bool) -> None:
    """generation_0 fails: its requests move to generation_1; the client sees one clean stream."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["multibyte"], 12, streaming=streaming, exclude=True)
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected
        assert c.client.engines(GEN) == ["generation_0", "generation_1"]
        if streaming:
            assert sink.responses[0].ids == expected[:1]  # the first token, sent once

    run(body, configs={"generation_0": FAIL})


class FailAfter:
    """Generation replies pass until `after` of them went by, then the engine reports a failure."""

    def __init__(self, inner: EngineClient, after: int) -> None:
        self.inner, self.after = inner, after

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        count = 0
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            if parameters.get("request_type") == GEN and count == self.after:
                yield EngineReply(error=RequestError("device lost", ErrorCode.UNAVAILABLE))
                return  # abandons the engine's stream: the engine sees the cancellation
            count += 1
            yield reply

    async def is_ready(self, engine: str) -> bool:
        return await self.inner.is_ready(engine)


def test_generation_failure_after_streamed_tokens_ends_unavailable_without_migrations() -> None:
    """max_migrations=0: tokens already reached the client, so no retry, one UNAVAILABLE final
    error with the old wording, nothing leaks."""

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 20, streaming=True), "r")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE
        assert "generation_0" in error.message and "device lost" in error.message and "not retried" in error.message
        assert len(sink.responses) >= 2 and c.client.engines(GEN) == ["generation_0"]
        assert migrations(c) == 0

    run(body, wrap=lambda inner: FailAfter(inner, 3), routing={"max_migrations": 0})


# -- request migration ----------------------------------------------------------------------

# Crashes after streaming 3 tokens (its first reply repeats the context's first token, so
# the client has 3 generated tokens when it fails); round robin without a breaker sends
# each new request to generation_0 first, so every streaming request meets the crash.
CRASH_AT = 3
MIGRATING = {"generation_policy": "round_robin", "context_policy": "round_robin", "breaker_failures": 1000}


def crashing(phase: str = "generation") -> Any:
    return FREE.__class__.free(kv_lease_timeout_s=0.5, fault="crash", fault_after_tokens=CRASH_AT, fault_phase=phase)


def migrations(c: Cluster, **labels: str) -> float:
    registry = c.orch.telemetry.registry
    if not labels:
        return registry.total("disagg_orchestrator_migrations_total")  # type: ignore[attr-defined]
    return registry.value("disagg_orchestrator_migrations_total", **labels)  # type: ignore[attr-defined]


def outputs(sink: RecordingResponseSink) -> list[EngineOutput]:
    return [EngineOutput.from_tensors(r.tensors) for r in sink.responses if r.tensors is not None]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_crash_after_streamed_tokens_migrates_and_the_stream_is_exact(prompt: str, sampled: bool) -> None:
    """generation_0 crashes mid-stream: a context phase over prompt + the 3 tokens so far, then
    generation_1 go on; the client sees one stream, each token once, equal to an undisturbed
    run's tokens and text, with cumulative counts and the first token's perf times kept."""
    perf = {"return_perf_metrics": np.array([[True]]), "return_num_output_tokens": np.array([[True]])}

    async def body(c: Cluster) -> None:
        tensors = client_tensors(prompt, 24, streaming=True, extra={**(SAMPLED if sampled else {}), **perf})
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected
        assert_same_text(sink.text, completion_text(TOK, prompt_ids(tensors), expected))
        assert c.client.calls == [
            ("context_0", CTX), ("generation_0", GEN), ("context_1", CTX), ("generation_1", GEN),
        ]  # fmt: skip
        outs = outputs(sink)
        assert [len(o.tokens) for o in outs[:4]] == [1, 1, 1, 1]  # the continuation's first token is the 4th
        counts = [o.num_output_tokens for o in outs]
        assert counts == sorted(counts) and counts[-1] == len(expected)
        assert len({o.perf.arrival_time_ns for o in outs if o.perf}) == 1
        assert len({o.perf.first_token_time_ns for o in outs if o.perf}) == 1
        assert migrations(c, engine="generation_0", outcome="ok") == 1 and migrations(c) == 1
        assert c.orch.router.retries["generation"] == 0  # a migration is not a retry

    run(body, configs={"generation_0": crashing()}, routing=MIGRATING)


@pytest.mark.parametrize("cut", [(2, 4), (2, 5)], ids=["ends-on-context-token", "ends-on-generation-token"])
def test_stop_word_across_the_cut_is_found_and_ends_the_continuation(cut: tuple[int, int]) -> None:
    """A stop word that began before the crash and ends after it: only the orchestrator sees
    it whole. It ends the stream exactly where an undisturbed run ends; the continuation's
    unpulled lease or still-running child is stopped (the harness's leak check)."""

    async def body(c: Cluster) -> None:
        plain = client_tensors(PROMPTS["ascii"], 24, streaming=True)
        word = (await oracle(plain))[cut[0] : cut[1]]
        ids, offsets = build_word_list([word])
        stop = {"stop_words_list": np.array([[ids, offsets]], dtype=np.int32)}
        tensors = client_tensors(PROMPTS["ascii"], 24, streaming=True, extra=stop)
        expected = await oracle(tensors)
        assert len(expected) == cut[1] and CRASH_AT < cut[1]  # the word is found only across the cut
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected
        assert migrations(c, engine="generation_0", outcome="ok") == 1

    run(body, configs={"generation_0": crashing()}, routing=MIGRATING)


def test_aggregated_serving_migrates_to_another_engine_too() -> None:
    """No context pool: the continuation runs both phases on the other generation engine."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["emoji"], 16, streaming=True)
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected
        assert c.client.calls == [("generation_0", LOCAL), ("generation_1", LOCAL)]
        assert migrations(c, engine="generation_0", outcome="ok") == 1

    run(body, context=(), configs={"generation_0": crashing("any")}, routing=MIGRATING)


def test_a_second_crash_migrates_again_while_max_migrations_allows() -> None:
    """Both engines crash after 3 tokens: 9 tokens take two migrations (generation_0, then
    generation_1, then generation_0 again: only the engine that just failed is avoided)."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["multibyte"], 9, streaming=True)
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected and len(expected) == 9
        assert c.client.engines(GEN) == ["generation_0", "generation_1", "generation_0"]
        assert migrations(c, engine="generation_0", outcome="ok") == 1
        assert migrations(c, engine="generation_1", outcome="ok") == 1

    both = {"generation_0": crashing(), "generation_1": crashing()}
    run(body, configs=both, routing={**MIGRATING, "max_migrations": 2})


def test_spent_migration_budget_ends_unavailable_and_says_so() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 24, streaming=True)
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE
        assert (
            error.message.startswith("generation phase failed on engine 'generation_1'")
            and "crashed mid-stream" in error.message
        )
        assert (
            "(after tokens were streamed: migrated 1 time, from generation_0; max_migrations=1 spent)" in error.message
        )
        assert sink.ids == expected[: 2 * CRASH_AT]  # what both engines streamed, each token once
        assert migrations(c, engine="generation_0", outcome="unavailable") == 1

    run(body, configs={"generation_0": crashing(), "generation_1": crashing()}, routing=MIGRATING)


def test_migration_with_nowhere_to_go_ends_unavailable_and_says_so() -> None:
    """The only generation engine failed: the migration cannot start; one UNAVAILABLE."""

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 24, streaming=True), "r")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "crashed mid-stream" in error.message
        assert (
            "(after tokens were streamed: migration 1 of max_migrations=1 failed: no generation engine is available"
            in error.message
        )
        assert len(sink.responses) == CRASH_AT
        assert migrations(c, engine="generation_0", outcome="unavailable") == 1

    run(body, generation=("generation_0",), configs={"generation_0": crashing()}, routing=MIGRATING)


def test_crash_after_streamed_tokens_without_migrations_ends_unavailable_as_before() -> None:
    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 24, streaming=True), "r")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE
        assert error.message.endswith("crashed mid-stream (injected fault) (after tokens were streamed: not retried)")
        assert c.client.engines(GEN) == ["generation_0"] and migrations(c) == 0

    run(body, configs={"generation_0": crashing()}, routing={**MIGRATING, "max_migrations": 0})


def test_silent_engine_times_out_and_the_phase_moves_on() -> None:
    """A context engine that never answers costs engine_timeout_s, then context_1 serves; the
    abandoned request is cancelled on the stalled engine (the no-leak check proves it)."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 4, streaming=False)
        await serve_ok(c, tensors, "r")
        assert c.client.engines(CTX) == ["context_0", "context_1"]
        await until(lambda: c.cores["context_0"].active == 0)

    stall = FREE.__class__.free(kv_lease_timeout_s=0.5, fault="stall")
    run(body, configs={"context_0": stall}, routing={"engine_timeout_s": 0.2})


def test_every_engine_failing_ends_in_one_unavailable() -> None:
    """Both context engines fail: max_retries bounds the attempts, the client gets one error."""

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=True), "r")
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "injected fault" in error.message
        assert len(sink.calls) == 1 and c.client.engines(GEN) == []
        assert c.client.engines(CTX) == ["context_0", "context_1"]  # each engine once, then the last error

    run(body, configs={"context_0": FAIL, "context_1": FAIL})


class StealLease:
    """Before the first generation request, another puller takes its KV lease: the real
    engine then answers NOT_FOUND (the lease is gone), as after an expiry."""

    def __init__(self, inner: EngineClient, thief: EngineCore) -> None:
        self.inner, self.thief, self.stolen = inner, thief, False

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        if parameters.get("request_type") == GEN and not self.stolen:
            self.stolen = True
            sink = CollectingSink()
            await self.thief.start()
            self.thief.submit(parse_request(tensors, parameters, "thief"), sink)
            await sink.done.wait()
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            yield reply

    async def is_ready(self, engine: str) -> bool:
        return await self.inner.is_ready(engine)


def run_with_lease_thief(body: Callable[[Cluster], Awaitable[None]], **cluster_kw: Any) -> None:
    """`run` with a StealLease client whose thief engine is closed after the scenario."""
    thief = EngineCore("thief", FREE)

    async def scenario(c: Cluster) -> None:
        try:
            await body(c)
        finally:
            await thief.close()

    run(scenario, wrap=lambda inner: StealLease(inner, thief), **cluster_kw)


@pytest.mark.parametrize("streaming", [False, True])
def test_lost_kv_lease_reruns_the_context_phase(streaming: bool) -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["cjk"], 10, streaming=streaming, exclude=True)
        expected = await oracle(tensors)
        sink = await c.serve(tensors, "r")
        sink.succeeded()
        assert sink.ids == expected
        assert c.client.engines(CTX) == ["context_0", "context_1"]  # the second run of the context phase
        assert c.client.engines(GEN) == ["generation_0", "generation_0"]  # not the engine's fault: same engine
        assert c.orch.router.pools[Phase.GENERATION].get("generation_0").breaker.state is BreakerState.CLOSED  # type: ignore[union-attr]

    run_with_lease_thief(body, generation=("generation_0",))


def test_lost_kv_lease_without_retries_left_is_unavailable() -> None:
    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 6, streaming=False), "r")
        error = sink.failed()
        assert (
            error.code is ErrorCode.UNAVAILABLE
            and "KV cache was lost" in error.message
            and "no such lease" in error.message
        )

    run_with_lease_thief(body, routing={"max_retries": 0})


# -- conditional disaggregation ---------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_short_prompt_runs_both_phases_on_the_generation_engine(streaming: bool) -> None:
    async def body(c: Cluster) -> None:
        short = client_tensors(PROMPTS["ascii"], 8, streaming=streaming, exclude=True)
        assert await serve_ok(c, short, "s") == await oracle(short)
        assert c.client.calls == [("generation_0", LOCAL)]
        long = client_tensors(LONG, 8, streaming=streaming, exclude=True)
        assert await serve_ok(c, long, "l") == await oracle(long)
        assert c.client.calls[1:] == [("context_0", CTX), ("generation_1", GEN)]
        assert c.orch.router.local == {"short_prompt": 1} and c.orch.router.disaggregated == 1

    run(body, routing={"local_prefill_max_tokens": 64})


def test_prompt_cached_on_the_generation_engine_skips_the_context_hop() -> None:
    """Only the uncached part counts: a long prompt whose prefix the generation engine holds goes local."""

    async def body(c: Cluster) -> None:
        first = client_tensors(LONG, 4, streaming=False, exclude=True)
        await serve_ok(c, first, "a")
        again = client_tensors(LONG + "one more line", 4, streaming=False, exclude=True)
        assert await serve_ok(c, again, "b") == await oracle(again)
        assert c.client.calls == [("context_0", CTX), ("generation_0", GEN), ("generation_0", LOCAL)]

    run(body, generation=("generation_0",), routing={"local_prefill_max_tokens": 64, "generation_policy": "kv_aware"})


def test_saturated_context_pool_keeps_requests_local() -> None:
    async def body(c: Cluster) -> None:
        batch = [client_tensors(LONG, 4, streaming=True) for _ in range(3)]
        sinks = await c.serve_all(batch)
        for sink in sinks:
            sink.succeeded()
        assert c.client.engines(CTX) == ["context_0"]
        assert c.client.engines(LOCAL) == ["generation_1", "generation_0"]
        assert c.orch.router.local == {"context_saturated": 2}

    run(body, context=("context_0",), routing={"context_queue_threshold": 1})


# -- KV-aware routing -------------------------------------------------------------------------


def test_kv_aware_routes_a_shared_prefix_to_its_engines_and_reports_reuse() -> None:
    perf = {"return_perf_metrics": np.array([[True]], dtype=bool)}

    async def body(c: Cluster) -> None:
        reused, prompts = [], []
        for i in range(4):
            tensors = client_tensors(LONG + f" question {i}?", 4, streaming=False, extra=perf)
            prompts.append(parse_request(tensors, {}, "x").input_ids)
            sink = await c.serve(tensors, f"r{i}")
            reused.append(int(sink.succeeded().tensors["kv_cache_reused_blocks"].reshape(-1)[0]))  # type: ignore[index]
        assert len(set(c.client.engines(CTX))) == 1 and len(set(c.client.engines(GEN))) == 1
        common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
        shared_blocks = common // 32
        assert shared_blocks >= 4 and reused[0] == 0
        assert reused[1:] == [2 * shared_blocks] * 3, reused  # the context and the generation engine reused it
        assert [d.matched_blocks for d in c.orch.router.log if d.phase is Phase.CONTEXT] == [0] + [shared_blocks] * 3

    run(body, routing={"context_policy": "kv_aware", "generation_policy": "kv_aware"})


# -- live membership and readiness ------------------------------------------------------------


def test_pool_file_changes_membership_while_serving(tmp_path: Path) -> None:
    pool_file = tmp_path / "pools.json"

    def write(context: list[str]) -> None:
        pool_file.write_text(json.dumps({"context_engines": context, "generation_engines": ["generation_0"]}))

    write(["context_0"])

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
        await serve_ok(c, tensors, "a")
        write(["context_0", "context_1", "context_2"])
        await until(lambda: c.orch.router.pools_names("context") == ("context_0", "context_1", "context_2"))
        for i in range(3):
            await serve_ok(c, tensors, f"b{i}")
        assert c.client.engines(CTX)[1:] == ["context_1", "context_2", "context_0"]  # the new ones get traffic
        write(["context_2"])
        await until(lambda: c.orch.router.pools_names("context") == ("context_2",))
        await serve_ok(c, tensors, "c")
        assert c.client.engines(CTX)[-1] == "context_2"
        pool_file.write_text("{not json")  # a half-written file changes nothing
        await until(lambda: c.orch.membership.rejected == 1)
        await serve_ok(c, tensors, "d")
        assert c.orch.router.pools_names("context") == ("context_2",) and c.orch.membership.reloads == 2

    run(
        body,
        context=("context_0",),
        generation=("generation_0",),
        loaded=("context_0", "context_1", "context_2", "generation_0"),
        routing={"pool_file": str(pool_file), "pool_poll_s": 0.01},
    )


def test_readiness_probe_takes_a_dead_engine_out_and_back() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
        dead = c.cores["context_1"]
        await dead.close()  # not ready: the probe marks it before any request tries it
        state = c.orch.router.pools[Phase.CONTEXT].get("context_1")
        assert state is not None
        c.orch.membership.ensure_started()
        await until(lambda: not state.ready)
        for i in range(4):
            await serve_ok(c, tensors, f"a{i}")
        assert c.client.engines(CTX) == ["context_0"] * 4 and state.failures == 0
        fresh = EngineCore("context_1", FREE)
        c.cores["context_1"] = fresh
        c.client.inner.engines["context_1"] = fresh  # type: ignore[attr-defined]
        await until(lambda: state.ready)
        for i in range(2):
            await serve_ok(c, tensors, f"b{i}")
        assert "context_1" in c.client.engines(CTX)[-2:]

    run(body, routing={"health_check_s": 0.01})


def test_continuation_inputs_carry_prompt_plus_generated_and_the_rest_of_the_budget() -> None:
    tensors = client_tensors(
        PROMPTS["ascii"], 10, streaming=True, extra={"min_tokens": np.array([[4]], dtype=np.int32)}
    )
    request = parse_request(tensors, {}, "r")
    cont = parse_request(continuation_tensors(tensors, request, [7, 8, 9]), {}, "r:m1")
    assert cont.input_ids == request.input_ids + (7, 8, 9)
    assert cont.stop.max_new_tokens == 7 and cont.sampling.min_tokens == 1
    assert cont.stop.stop_words == request.stop.stop_words and cont.sampling.key() == request.sampling.key()
    with pytest.raises(ValueError, match="nothing left to continue"):
        continuation_tensors(tensors, request, list(range(10)))
