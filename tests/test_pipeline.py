"""The Orchestrator over real EngineCores, reached through InProcessEngineClient (no Triton).

Each scenario runs preprocess -> Orchestrator -> postprocess on one asyncio loop, with
engines whose cost model is all zeros. The reference ("oracle") tokens come from an
aggregated EngineCore fed the same contract tensors. Every scenario ends by checking that
the orchestrator kept no task (`in_flight` is empty).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import pytest

from orchestrator.config import OrchestratorConfig
from orchestrator.contract import EngineOutput, parse_request
from orchestrator.detokenize import completion_text
from orchestrator.engine.config import EngineConfig
from orchestrator.engine.core import EngineCore
from orchestrator.engine_client import EngineClient, EngineReply, InProcessEngineClient
from orchestrator.errors import ErrorCode, RequestError
from orchestrator.pipeline import Orchestrator
from orchestrator.postprocess import postprocess
from orchestrator.preprocess import TextLimits, preprocess
from orchestrator.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()
T = TypeVar("T")
Tensors = dict[str, np.ndarray]

CONTEXT = ("context_0", "context_1")
GENERATION = ("generation_0", "generation_1")
PROMPTS = {
    "ascii": "the cat sat on the mat and the dog sat on the log",
    "multibyte": "héllo wörld, naïve café: the crème brûlée was très bien",
    "cjk": "你好世界，今天天气很好。我们去公园散步吧，你好世界",
    "emoji": "party time 🎉👍🏽 then more 🎉 and 🚀🚀 and 👍🏽🎉",
}
SAMPLED: dict[str, np.ndarray] = {
    "temperature": np.array([[0.8]], dtype=np.float32),
    "runtime_top_k": np.array([[5]], dtype=np.int32),
    "seed": np.array([[11]], dtype=np.uint64),
}


# -- harness ------------------------------------------------------------------------------


@dataclass
class Response:
    """One call the client's response sink received."""

    final: bool
    tensors: Tensors | None = None
    error: RequestError | None = None
    engine_calls: tuple[tuple[str, str], ...] = ()  # what the engine client had been asked so far

    @property
    def ids(self) -> tuple[int, ...]:
        assert self.tensors is not None
        return EngineOutput.from_tensors(self.tensors).tokens

    @property
    def text(self) -> str:
        assert self.tensors is not None
        return postprocess(TOK, self.tensors)["text_output"].reshape(-1)[0].decode("utf-8")


@dataclass
class RecordingResponseSink:
    """A ResponseSink that records each call, and the engine calls made before it."""

    client: RecordingClient | None = None
    calls: list[Response] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first: asyncio.Event = field(default_factory=asyncio.Event)

    def _engine_calls(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.client.calls) if self.client is not None else ()

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        self.calls.append(Response(final, tensors=tensors, engine_calls=self._engine_calls()))
        self.first.set()
        if final:
            self.done.set()

    def fail(self, error: RequestError) -> None:
        self.calls.append(Response(True, error=error, engine_calls=self._engine_calls()))
        self.first.set()
        self.done.set()

    @property
    def responses(self) -> list[Response]:
        return [c for c in self.calls if c.tensors is not None]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(t for r in self.responses for t in r.ids)

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)

    def terminal(self) -> Response:
        """Exactly one call is terminal (final send or fail) and it is the last one."""
        assert self.calls, "the client got no response"
        assert [c.final for c in self.calls].count(True) == 1, [c.final for c in self.calls]
        assert self.calls[-1].final
        return self.calls[-1]

    def succeeded(self) -> Response:
        last = self.terminal()
        assert last.error is None, f"{last.error.code}: {last.error}" if last.error else ""
        return last

    def failed(self) -> RequestError:
        last = self.terminal()
        assert last.error is not None, "expected the request to fail"
        return last.error


class RecordingClient:
    """An EngineClient wrapper that records (engine, request_type) of every child request."""

    def __init__(self, inner: EngineClient) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[EngineReply]:
        self.calls.append((engine, str(parameters.get("request_type"))))
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            yield reply

    def engines(self, request_type: str) -> list[str]:
        return [engine for engine, kind in self.calls if kind == request_type]


class BrokenClient:
    """An EngineClient whose stream for one phase raises after `after` replies (a bug, not an engine error)."""

    def __init__(self, inner: EngineClient, request_type: str, after: int, exc: BaseException) -> None:
        self.inner, self.request_type, self.after, self.exc = inner, request_type, after, exc

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[EngineReply]:
        count = 0
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            if parameters.get("request_type") == self.request_type and count == self.after:
                raise self.exc
            count += 1
            yield reply
        if parameters.get("request_type") == self.request_type and count <= self.after:
            raise self.exc


# Zero-cost engines; a short lease timeout so an orphaned prefill (its generation phase
# failed before pulling) expires within the scenario's no-leak check.
FREE = EngineConfig.free(kv_lease_timeout_s=0.5)


@dataclass
class Cluster:
    cores: dict[str, EngineCore]
    client: RecordingClient
    orch: Orchestrator

    async def serve(self, tensors: Tensors, rid: str = "") -> RecordingResponseSink:
        sink = RecordingResponseSink(self.client)
        task = self.orch.start(parse_request(tensors, {}, rid), tensors, sink)
        await task
        assert sink.done.is_set()
        return sink

    async def serve_all(self, requests: Sequence[Tensors]) -> list[RecordingResponseSink]:
        """Start every request before awaiting any of them."""
        sinks = [RecordingResponseSink(self.client) for _ in requests]
        tasks = [self.orch.start(parse_request(t, {}, f"r{i}"), t, s) for i, (t, s) in enumerate(zip(requests, sinks))]
        assert len(self.orch.in_flight) == len(requests)
        await asyncio.gather(*tasks)
        return sinks

    def steps(self, names: Sequence[str]) -> int:
        return sum(self.cores[n].steps for n in names)


def cluster(
    context: Sequence[str] = CONTEXT,
    generation: Sequence[str] = GENERATION,
    loaded: Sequence[str] = CONTEXT + GENERATION,
    configs: Mapping[str, EngineConfig] | None = None,
    wrap: Callable[[EngineClient], EngineClient] = lambda c: c,
) -> Cluster:
    """Engines named in `loaded` exist; the orchestrator is configured with `context`/`generation` pools."""
    configs = configs or {}
    cores = {name: EngineCore(name, configs.get(name, FREE)) for name in loaded}
    client = RecordingClient(wrap(InProcessEngineClient(cores)))
    orch = Orchestrator(OrchestratorConfig(tuple(context), tuple(generation)), client)
    return Cluster(cores, client, orch)


def run(body: Callable[[Cluster], Awaitable[T]], **cluster_kw: Any) -> T:
    """Run a scenario on a fresh loop and cluster; the orchestrator must keep no task afterwards."""

    async def main() -> T:
        c = cluster(**cluster_kw)
        try:
            result = await body(c)
            assert c.orch.in_flight == {}, f"leaked tasks: {sorted(c.orch.in_flight)}"
            for core in c.cores.values():  # every block back in its pool, every lease ended
                await asyncio.wait_for(core.wait_idle(), core.config.kv_lease_timeout_s + 5)
                core.check_idle()
        finally:
            for core in c.cores.values():
                await core.close()
        return result

    return asyncio.run(main())


def client_tensors(
    prompt: str,
    max_tokens: int,
    *,
    streaming: bool,
    exclude: bool = False,
    stop_words: Sequence[str] = (),
    extra: Mapping[str, np.ndarray] | None = None,
) -> Tensors:
    """The orchestrator's inputs for a text request: preprocess output plus the client's flags."""
    raw = {
        "text_input": np.array([[prompt.encode()]], dtype=object),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
    }
    if stop_words:
        raw["stop_words"] = np.array([[w.encode() for w in stop_words]], dtype=object)
    tensors = preprocess(TOK, raw, TextLimits())
    tensors["streaming"] = np.array([[streaming]], dtype=bool)
    tensors["exclude_input_in_output"] = np.array([[exclude]], dtype=bool)
    tensors.update(extra or {})
    return tensors


async def oracle(tensors: Tensors) -> tuple[int, ...]:
    """Generated tokens of the same request on one aggregated engine (prompt excluded)."""
    core = EngineCore("oracle", EngineConfig.free())
    request = parse_request(
        {**tensors, "streaming": np.array([[False]]), "exclude_input_in_output": np.array([[True]])}, {}, "oracle"
    )
    done = asyncio.Event()
    outputs: list[EngineOutput] = []
    errors: list[RequestError] = []

    class Sink:
        def send(self, output: EngineOutput, final: bool) -> None:
            outputs.append(output)
            if final:
                done.set()

        def fail(self, error: RequestError) -> None:
            errors.append(error)
            done.set()

        def cancelled(self) -> bool:
            return False

    try:
        core.submit(request, Sink())
        await done.wait()
    finally:
        await core.close()
    assert not errors and len(outputs) == 1
    return outputs[0].tokens


def assert_same_text(streamed: str, expected: str) -> None:
    """Streamed text equals the non-streaming text; where the model emitted invalid UTF-8 mid-text,
    only the number of U+FFFD may differ (the documented limit of orchestrator.detokenize)."""
    if "\ufffd" in expected.rstrip("\ufffd"):
        assert streamed.replace("\ufffd", "") == expected.replace("\ufffd", "")
    else:
        assert streamed == expected


def prompt_ids(tensors: Tensors) -> tuple[int, ...]:
    return tuple(int(t) for t in tensors["input_ids"].reshape(-1))


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
    """A context stream that ends with no reply fails the request with UNAVAILABLE naming the engine."""

    class Silent:
        async def stream(
            self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
        ) -> AsyncIterator[EngineReply]:
            return
            yield EngineReply()  # pragma: no cover - makes this an async generator

    async def body(c: Cluster) -> None:
        sink = await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=True))
        error = sink.failed()
        assert error.code is ErrorCode.UNAVAILABLE and "context_0" in error.message
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
