"""Harness for running the Orchestrator over real EngineCores through InProcessEngineClient (no Triton).

A scenario runs preprocess -> Orchestrator -> postprocess on one asyncio loop, with
engines whose cost model is all zeros. The reference ("oracle") tokens come from an
aggregated EngineCore fed the same contract tensors. `run` ends every scenario by checking
that the orchestrator kept no task and every engine gave back every block and lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from orchestrator.clients.engine_client import EngineClient, EngineReply, InProcessEngineClient
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.pipeline import Orchestrator
from orchestrator.serving.router import Router
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.text.postprocess import postprocess
from orchestrator.text.preprocess import TextLimits, preprocess
from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.wire.contract import EngineOutput, parse_request
from orchestrator.wire.errors import RequestError

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
    ) -> AsyncGenerator[EngineReply, None]:
        self.calls.append((engine, str(parameters.get("request_type"))))
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            yield reply

    async def is_ready(self, engine: str) -> bool:
        return await self.inner.is_ready(engine)

    def engines(self, request_type: str) -> list[str]:
        return [engine for engine, kind in self.calls if kind == request_type]


class BrokenClient:
    """An EngineClient whose stream for one phase raises after `after` replies (a bug, not an engine error)."""

    def __init__(self, inner: EngineClient, request_type: str, after: int, exc: BaseException) -> None:
        self.inner, self.request_type, self.after, self.exc = inner, request_type, after, exc

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        count = 0
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            if parameters.get("request_type") == self.request_type and count == self.after:
                raise self.exc
            count += 1
            yield reply
        if parameters.get("request_type") == self.request_type and count <= self.after:
            raise self.exc

    async def is_ready(self, engine: str) -> bool:
        return await self.inner.is_ready(engine)


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
    routing: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Cluster:
    """Engines named in `loaded` exist; the orchestrator is configured with `context`/`generation`
    pools and `routing` overrides of OrchestratorConfig (readiness probes off unless asked for)."""
    configs = configs or {}
    cores = {name: EngineCore(name, configs.get(name, FREE)) for name in loaded}
    client = RecordingClient(wrap(InProcessEngineClient(cores)))
    settings = {"health_check_s": 0.0, **(routing or {})}
    config = OrchestratorConfig(tuple(context), tuple(generation), **settings)
    orch = Orchestrator(config, client, Router(config, clock))
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
            await c.orch.close()
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


class CollectingSink:
    """An engine Sink that keeps what one request produced and signals its end."""

    def __init__(self) -> None:
        self.outputs: list[EngineOutput] = []
        self.errors: list[RequestError] = []
        self.done = asyncio.Event()

    def send(self, output: EngineOutput, final: bool) -> None:
        self.outputs.append(output)
        if final:
            self.done.set()

    def fail(self, error: RequestError) -> None:
        self.errors.append(error)
        self.done.set()

    def cancelled(self) -> bool:
        return False


async def oracle(tensors: Tensors) -> tuple[int, ...]:
    """Generated tokens of the same request on one aggregated engine (prompt excluded)."""
    core = EngineCore("oracle", EngineConfig.free())
    request = parse_request(
        {**tensors, "streaming": np.array([[False]]), "exclude_input_in_output": np.array([[True]])}, {}, "oracle"
    )
    sink = CollectingSink()
    try:
        core.submit(request, sink)
        await sink.done.wait()
    finally:
        await core.close()
    assert not sink.errors and len(sink.outputs) == 1
    return sink.outputs[0].tokens


def assert_same_text(streamed: str, expected: str) -> None:
    """Streamed text equals the non-streaming text; where the model emitted invalid UTF-8 mid-text,
    only the number of U+FFFD may differ (the documented limit of orchestrator.text.detokenize)."""
    if "\ufffd" in expected.rstrip("\ufffd"):
        assert streamed.replace("\ufffd", "") == expected.replace("\ufffd", "")
    else:
        assert streamed == expected


def prompt_ids(tensors: Tensors) -> tuple[int, ...]:
    return tuple(int(t) for t in tensors["input_ids"].reshape(-1))
