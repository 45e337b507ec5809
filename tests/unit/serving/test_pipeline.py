"""The Orchestrator over real EngineCores, reached through InProcessEngineClient (no Triton).

Scenarios run on `tests.pipeline_harness`: zero-cost engines, an aggregated oracle, and a
no-leak check after each one (no orchestrator task, every block and lease back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from orchestrator.clients.engine_client import EngineReply
from orchestrator.text.detokenize import completion_text
from orchestrator.wire.contract import parse_request
from orchestrator.wire.errors import ErrorCode
from tests.pipeline_harness import (
    CONTEXT,
    FREE,
    GENERATION,
    PROMPTS,
    SAMPLED,
    TOK,
    BrokenClient,
    Cluster,
    RecordingResponseSink,
    Tensors,
    assert_same_text,
    client_tensors,
    cluster,
    oracle,
    prompt_ids,
    run,
)

# -- streaming and non-streaming ------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [2, 5, 24])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_streaming_sends_first_token_once_and_text_matches(prompt: str, sampled: bool, max_tokens: int) -> None:
    """Streaming: first response is the context's first token (sent before generation starts), no token
    is repeated, one final response comes last, and the text equals the non-streaming completion."""

    async def body(c: Cluster) -> None:
        extra: dict[str, np.ndarray] = SAMPLED if sampled else {}
        streamed_in = client_tensors(prompt, max_tokens, streaming=True, extra=extra)
        generated = await oracle(streamed_in)
        assert len(generated) == max_tokens
        sink = await c.serve(streamed_in, "s")
        sink.succeeded()
        first = sink.responses[0]
        assert first.ids == generated[:1]
        assert not first.final
        assert [kind for _, kind in first.engine_calls] == ["context_only"], "first token precedes the generation phase"
        assert sink.ids == generated
        expected = completion_text(TOK, prompt_ids(streamed_in), generated)
        assert_same_text(sink.text, expected)
        whole = await c.serve(client_tensors(prompt, max_tokens, streaming=False, exclude=True, extra=extra), "n")
        (only,) = whole.calls
        assert only.final and only.text == expected

    run(body)


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_non_streaming_sends_one_final_response(prompt: str, exclude: bool) -> None:
    """Non-streaming: one final response with prompt + generated ids (or generated alone) and matching text."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(prompt, 12, streaming=False, exclude=exclude)
        generated = await oracle(tensors)
        prompt_tokens = prompt_ids(tensors)
        sink = await c.serve(tensors)
        (only,) = sink.calls
        assert only.final and only.error is None
        if exclude:
            assert only.ids == generated
            assert only.text == completion_text(TOK, prompt_tokens, generated)
        else:
            assert only.ids == prompt_tokens + generated
            assert only.text == TOK.decode(prompt_tokens + generated)
        assert c.client.engines("context_only") and c.client.engines("generation_only")

    run(body)


@pytest.mark.parametrize("streaming", [False, True])
def test_max_tokens_1_finishes_in_the_context_phase(streaming: bool) -> None:
    """max_tokens=1: one final response with the first token; no generation engine is asked or steps."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 1, streaming=streaming, exclude=True)
        generated = await oracle(tensors)
        sink = await c.serve(tensors)
        (only,) = sink.calls
        assert only.final and only.ids == generated and len(generated) == 1
        assert c.client.engines("generation_only") == []
        assert c.steps(GENERATION) == 0
        assert c.steps(CONTEXT) == 1

    run(body)


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_word_ends_the_request(streaming: bool) -> None:
    """A stop word ends output right after it: the orchestrator recognises it and sends one final response."""

    async def body(c: Cluster) -> None:
        prompt = PROMPTS["ascii"]
        free = await oracle(client_tensors(prompt, 20, streaming=False))
        word = TOK.decode(free[4:6])
        assert TOK.encode(word) == list(free[4:6])
        tensors = client_tensors(prompt, 20, streaming=streaming, exclude=True, stop_words=[word])
        expected = await oracle(tensors)
        assert expected[-2:] == free[4:6] and len(expected) <= 6
        sink = await c.serve(tensors)
        sink.succeeded()
        assert sink.ids == expected
        assert sink.text == completion_text(TOK, prompt_ids(tensors), expected)

    run(body)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("end_at", [0, 1, 3], ids=["first-token", "second-token", "fourth-token"])
def test_end_id_ends_the_request(end_at: int, streaming: bool) -> None:
    """With end_id = the token the model generates at index k, the client gets exactly the first k tokens
    (end token excluded) and one final response, whichever phase meets the end token."""

    async def body(c: Cluster) -> None:
        prompt = PROMPTS["ascii"]
        free = await oracle(client_tensors(prompt, 20, streaming=False))
        assert free[end_at] not in free[:end_at]
        tensors = client_tensors(
            prompt, 20, streaming=streaming, exclude=True, extra={"end_id": np.array([[free[end_at]]], dtype=np.int32)}
        )
        assert await oracle(tensors) == free[:end_at]
        sink = await c.serve(tensors)
        sink.succeeded()
        assert sink.ids == free[:end_at]
        assert sink.text == completion_text(TOK, prompt_ids(tensors), free[:end_at])
        assert (c.client.engines("generation_only") == []) == (end_at == 0)

    run(body)


# -- routing --------------------------------------------------------------------------------


def test_round_robin_alternates_both_pools() -> None:
    """Consecutive requests alternate context_0/context_1 and generation_0/generation_1."""

    async def body(c: Cluster) -> None:
        for i in range(6):
            (await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=i % 2 == 0))).succeeded()
        assert c.client.engines("context_only") == list(CONTEXT) * 3
        assert c.client.engines("generation_only") == list(GENERATION) * 3
        assert all(c.cores[name].steps > 0 for name in CONTEXT + GENERATION)

    run(body)


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_context_pool_serves_aggregated(streaming: bool) -> None:
    """No context engines: every request runs whole (no request_type) on a generation-pool
    engine, with the same tokens as the oracle; the aggregated baseline of a deployment."""

    async def body(c: Cluster) -> None:
        for i in range(4):
            tensors = client_tensors(PROMPTS["ascii"], 6, streaming=streaming, exclude=True)
            generated = await oracle(tensors)
            sink = await c.serve(tensors, f"a{i}")
            sink.succeeded()
            assert sink.ids == generated
        assert c.client.engines("context_only") == [] and c.client.engines("generation_only") == []
        assert c.client.engines("None") == list(GENERATION) * 2  # no request_type parameter
        assert c.orch.router.local == {"aggregated": 4}

    run(body, context=())


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_generation_engine_fails_unavailable_once(streaming: bool) -> None:
    """A generation engine that is not loaded: exactly one fail(UNAVAILABLE) naming it, nothing after it."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 8, streaming=streaming)
        generated = await oracle(tensors)
        sink = await c.serve(tensors)
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE
        assert "generation_9" in error.message
        if streaming:
            assert [r.ids for r in sink.responses] == [generated[:1]], "the first token went out before the failure"
        else:
            assert sink.responses == []

    run(body, generation=("generation_9",))


def test_missing_context_engine_fails_unavailable() -> None:
    """A context engine that is not loaded: one fail(UNAVAILABLE) naming it, and no generation call."""

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 8, streaming=True))
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "context_9" in error.message
        assert len(sink.calls) == 1
        assert c.client.engines("generation_only") == []

    run(body, context=("context_9",))


@pytest.mark.parametrize("streaming", [False, True])
def test_prompt_too_long_for_context_engine_stays_invalid_arg(streaming: bool) -> None:
    """An engine's INVALID_ARG (prompt above its max_input_len) reaches the client as INVALID_ARG, once."""

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 8, streaming=streaming))
        error = sink.failed()
        assert error.code is ErrorCode.INVALID_ARG
        assert "max_input_len=4" in error.message
        assert len(sink.calls) == 1
        assert c.steps(CONTEXT + GENERATION) == 0

    run(body, configs={name: replace(FREE, max_input_len=4) for name in CONTEXT})


def test_generation_engine_invalid_arg_after_first_token() -> None:
    """A generation engine's INVALID_ARG after the first token was streamed: still INVALID_ARG, one terminal call."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 8, streaming=True)
        generated = await oracle(tensors)
        sink = await c.serve(tensors)
        error = sink.failed()
        assert error.code is ErrorCode.INVALID_ARG
        assert [r.ids for r in sink.responses] == [generated[:1]]

    run(body, configs={name: replace(FREE, max_input_len=4) for name in GENERATION})


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("phase", "after"),
    [("context_only", 0), ("generation_only", 0), ("generation_only", 1), ("generation_only", 3)],
)
def test_unexpected_client_exception_is_one_clean_error(phase: str, after: int, streaming: bool) -> None:
    """An engine client that raises mid-stream ends the request with one INTERNAL/UNAVAILABLE fail()
    whose message carries no traceback, after at most the tokens already produced."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 16, streaming=streaming)
        generated = await oracle(tensors)
        sink = await c.serve(tensors)
        error = sink.failed()
        assert error.code in (ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE)
        assert "Traceback" not in error.message and 'File "' not in error.message
        assert "socket closed" in error.message
        assert generated[: len(sink.ids)] == sink.ids
        assert all(not r.final for r in sink.responses)

    run(body, wrap=lambda inner: BrokenClient(inner, phase, after, ConnectionError("socket closed")))


def test_client_exception_after_the_final_response_is_not_reported() -> None:
    """Streaming: once the final response went out, a later failure of the engine stream adds no call."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 6, streaming=True)
        generated = await oracle(tensors)
        sink = await c.serve(tensors)
        sink.succeeded()
        assert sink.ids == generated

    run(body, wrap=lambda inner: BrokenClient(inner, "generation_only", 10**6, ConnectionError("socket closed")))


def test_context_stream_without_reply_fails_unavailable() -> None:
    """Context streams that end with no reply: retried on the other engine, then one UNAVAILABLE naming the last."""

    class Silent:
        async def stream(
            self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
        ) -> AsyncGenerator[EngineReply, None]:
            return
            yield EngineReply()  # pragma: no cover - makes this an async generator

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=True))
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "'context_1' ended without a response" in error.message
        assert len(sink.calls) == 1

    run(body, wrap=lambda inner: Silent())


def test_cancelled_request_fails_cancelled_once() -> None:
    """Cancelling a request's task after its first token ends it with one fail(CANCELLED) and no leak."""

    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 200, streaming=True)
        sink = RecordingResponseSink(c.client)
        task = c.orch.start(parse_request(tensors, {}, "x"), tensors, sink)
        await sink.first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        error = sink.failed()
        assert error.code is ErrorCode.CANCELLED
        assert len(sink.ids) < 200

    run(body)


# -- concurrency ----------------------------------------------------------------------------


def _mixed_requests(count: int) -> list[Tensors]:
    prompts = list(PROMPTS.values())
    out = []
    for i in range(count):
        extra: dict[str, np.ndarray] = SAMPLED if i % 3 == 0 else {}
        out.append(
            client_tensors(
                prompts[i % len(prompts)] + f" {i}", 3 + i % 17, streaming=i % 2 == 0, exclude=i % 4 == 1, extra=extra
            )
        )
    return out


def test_concurrent_requests_match_sequential_runs() -> None:
    """32 requests at once through one Orchestrator give the same ids and text as one at a time."""

    async def body(c: Cluster) -> None:
        requests = _mixed_requests(32)
        sequential = cluster()
        one_by_one = []
        for i, t in enumerate(requests):
            one_by_one.append(await sequential.serve(t, f"r{i}"))
        assert sequential.orch.in_flight == {}
        together = await c.serve_all(requests)
        for t, alone, conc in zip(requests, one_by_one, together):
            conc.succeeded()
            alone.succeeded()
            assert conc.ids == alone.ids
            assert conc.text == alone.text
            generated = await oracle(t)
            streaming = bool(t["streaming"].reshape(-1)[0])
            exclude = bool(t["exclude_input_in_output"].reshape(-1)[0])
            assert conc.ids == (generated if streaming or exclude else prompt_ids(t) + generated)
            if streaming:
                assert_same_text(conc.text, completion_text(TOK, prompt_ids(t), generated))
        assert all(c.cores[name].steps > 0 for name in CONTEXT + GENERATION)

    run(body)
