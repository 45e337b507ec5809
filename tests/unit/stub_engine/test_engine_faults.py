"""The stub engine's `stop` (TensorRT-LLM's stop=true) wherever a request is, and each
injected fault kind. `run` checks afterwards that every block and lease came back."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.faults import chosen_fault
from orchestrator.wire.contract import RequestType
from orchestrator.wire.errors import ErrorCode, InvalidInput
from tests.engine_harness import PROMPT, context_blob, new_core, request, run, submit

GEN_ONLY = RequestType.GENERATION_ONLY


async def wait_for(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout_s)


# -- stop ---------------------------------------------------------------------------------


def test_stop_ends_a_running_request_with_one_final_output_and_frees_its_blocks() -> None:
    async def body() -> None:
        core = new_core()
        sink = await submit(core, request(PROMPT, rid="a", max_tokens=1000, streaming=True))
        other = await submit(core, request(PROMPT, rid="b", max_tokens=4))
        await sink.first.wait()
        assert core.stop("a") == 1
        sink.assert_well_formed()
        assert sink.outputs[-1].tokens == ()  # streaming: the empty final output
        assert core.state()["active_requests"] <= 1  # only "b" may be left
        await other.done.wait()
        other.assert_well_formed()  # the other request is untouched

    run(body)


def test_stop_of_a_non_streaming_request_returns_what_it_generated_so_far() -> None:
    async def body() -> None:
        core = new_core(decode_ms_per_step=1.0)
        sink = await submit(core, request(PROMPT, rid="a", max_tokens=500, streaming=False))
        await wait_for(lambda: core.steps >= 4)
        core.stop("a")
        sink.assert_well_formed()
        (out,) = sink.outputs
        assert 0 < len(out.tokens) < 500

    run(body)


def test_stop_reaches_a_queued_request_and_a_hung_one() -> None:
    async def body() -> None:
        core = new_core(max_batch_size=1)
        running = await submit(core, request(PROMPT, rid="run", max_tokens=1000, streaming=True))
        queued = await submit(core, request(PROMPT, rid="queued", max_tokens=4))
        hung = new_core("hung", fault="hang")
        stuck = await submit(hung, request(PROMPT, rid="stuck", max_tokens=4))
        await running.first.wait()
        assert core.stop("queued") == 1 and hung.stop("stuck") == 1
        queued.assert_well_formed()
        stuck.assert_well_formed()
        assert hung.state() == {"active_requests": 0, "leases": 0, "kv_blocks_in_use": 0, "kv_blocks_reserved": 0}
        core.stop("run")

    run(body)


def test_stop_drops_the_unpulled_lease_of_a_finished_context_phase() -> None:
    """The case no Triton cancellation can reach: the context request has ended, its KV waits."""

    async def body() -> None:
        ctx = new_core("ctx", kv_lease_timeout_s=60.0)
        first, blob = await context_blob(ctx, request(PROMPT, rid="p:ctx"))
        assert ctx.state()["leases"] == 1 and ctx.state()["kv_blocks_in_use"] > 0
        assert ctx.stop("p:ctx") == 1
        assert ctx.state() == {"active_requests": 0, "leases": 0, "kv_blocks_in_use": 0, "kv_blocks_reserved": 0}
        gen = new_core("gen")  # a late pull now finds nothing
        sink = await submit(gen, request(PROMPT, rid="p:gen", request_type=GEN_ONLY, blob=blob))
        await sink.done.wait()
        assert sink.assert_failed().code is ErrorCode.NOT_FOUND

    run(body)


def test_stop_of_a_generation_request_mid_pull_frees_both_sides() -> None:
    async def body() -> None:
        ctx = new_core("ctx", kv_lease_timeout_s=60.0)
        gen = new_core("gen", transfer_us_per_token=20_000.0)  # a pull that takes a while
        _, blob = await context_blob(ctx, request(PROMPT, rid="p:ctx"))
        sink = await submit(gen, request(PROMPT, rid="p:gen", request_type=GEN_ONLY, blob=blob))
        await wait_for(lambda: gen.queues.pulling)
        assert gen.stop("p:gen") == 1 and ctx.stop("p:ctx") == 1
        sink.assert_well_formed()
        await wait_for(lambda: not ctx.leases and not gen.active)

    run(body)


def test_stop_of_an_unknown_id_is_harmless_and_an_empty_id_is_refused() -> None:
    async def body() -> None:
        core = new_core()
        assert core.stop("never-seen") == 0
        with pytest.raises(InvalidInput, match="needs the request id"):
            core.stop("")

    run(body)


# -- injected faults ----------------------------------------------------------------------


def test_crash_fault_fails_after_the_configured_tokens_and_frees_blocks() -> None:
    async def body() -> None:
        core = new_core(fault="crash", fault_after_tokens=3)
        sink = await submit(core, request(PROMPT, rid="c", max_tokens=20, streaming=True))
        await sink.done.wait()
        error = sink.assert_failed()
        assert error.code is ErrorCode.UNAVAILABLE and "crashed mid-stream" in error.message
        assert sum(len(o.tokens) for o in sink.outputs) == 3

    run(body)


def test_crash_fault_on_a_context_request_fails_before_its_response() -> None:
    async def body() -> None:
        core = new_core(fault="crash", fault_phase="context")
        sink = await submit(core, request(PROMPT, rid="c", request_type=RequestType.CONTEXT_ONLY))
        await sink.done.wait()
        assert sink.assert_failed().code is ErrorCode.UNAVAILABLE and not sink.outputs

    run(body)


def test_drop_lease_fault_answers_but_leaves_nothing_to_pull() -> None:
    async def body() -> None:
        ctx = new_core("ctx", fault="drop_lease")
        _, blob = await context_blob(ctx, request(PROMPT, rid="d:ctx"))
        assert len(ctx.leases) == 0 and ctx.leases.dropped == 1
        gen = new_core("gen")
        sink = await submit(gen, request(PROMPT, rid="d:gen", request_type=GEN_ONLY, blob=blob))
        await sink.done.wait()
        assert sink.assert_failed().code is ErrorCode.NOT_FOUND

    run(body)


def test_slow_fault_lengthens_the_steps_it_is_in() -> None:
    """Measured in the step's modelled cost, not in wall time: a slow request's steps carry
    fault_delay_ms on top of the (zero) cost model."""

    async def body() -> None:
        core = new_core(fault="slow", fault_delay_ms=30.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sink = await submit(core, request(PROMPT, rid="s", max_tokens=3))
        await sink.done.wait()
        sink.assert_well_formed()
        assert loop.time() - started >= 3 * 0.030  # three steps, each at least the injected delay

    run(body)


def test_fault_parameter_injects_into_one_request_and_unknown_kinds_are_refused() -> None:
    async def body() -> None:
        core = new_core()
        await core.start()
        with pytest.raises(Exception, match="injected fault"):
            core.submit(request(PROMPT, rid="f"), None, "fail")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="'fault'='explode' is unknown"):
            core.submit(request(PROMPT, rid="g"), None, "explode")  # type: ignore[arg-type]
        ok = await submit(core, request(PROMPT, rid="h", max_tokens=2))
        await ok.done.wait()
        ok.assert_well_formed()  # the config has no fault: other requests are served

    run(body)


def test_fault_rate_picks_the_same_requests_every_time() -> None:
    async def body() -> None:
        core_a, core_b = new_core("a", fault="fail", fault_rate=0.5), new_core("b", fault="fail", fault_rate=0.5)
        ids = [f"req-{i}:ctx" for i in range(200)]
        picked_a = [chosen_fault(core_a.config, replace(request(PROMPT), request_id=i), None) for i in ids]
        picked_b = [chosen_fault(core_b.config, replace(request(PROMPT), request_id=i), None) for i in ids]
        assert picked_a == picked_b
        assert 60 < picked_a.count("fail") < 140  # about half

    run(body)


def test_fault_config_is_validated() -> None:
    with pytest.raises(ValueError, match="'fault' must be one of"):
        EngineConfig(fault="explode")
    with pytest.raises(ValueError, match="'fault_rate' must be between 0 and 1"):
        EngineConfig(fault="fail", fault_rate=1.5)
