"""The disaggregated request flow: context phase on one engine, generation on another.

For each request (all requests run concurrently, one asyncio task each):

1. pick a context engine, send the inputs with `request_type=context_only` (non-streaming)
   and wait for its single response: the first token and the opaque
   `context_phase_params` blob;
2. when streaming, send the first token to the client at once (TTFT is the context
   phase, not the context phase plus a generation round trip);
3. unless the context phase already finished the request, pick a generation engine and
   send the same inputs plus the blob, unchanged, with `request_type=generation_only`; its
   first reply repeats the first token, which is dropped;
4. end with exactly one final response: the last tokens carry the final flag when the
   stop rule recognises them as last, otherwise a closing response follows the stream.

Every response also carries a detokenization window (`detok_window`, see
`orchestrator.detokenize`) so the stateless postprocessing step renders exact text deltas.
Errors end the request with one typed error response; nothing escapes to Triton.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from orchestrator.config import OrchestratorConfig
from orchestrator.contract import FORWARDED_INPUTS, EngineOutput, EngineRequest, PerfMetrics, RequestType, with_batch_dim
from orchestrator.detokenize import DetokWindow, prompt_window
from orchestrator.engine_client import EngineClient
from orchestrator.errors import EngineUnavailable, ErrorCode, RequestError, as_request_error
from orchestrator.routing import RoutingPolicy, make_policy

Tensors = Mapping[str, np.ndarray]


class ResponseSink(Protocol):
    """One client request's response channel; exactly one call has final=True or is fail()."""

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None: ...

    def fail(self, error: RequestError) -> None: ...


@dataclass(slots=True)
class _Progress:
    """What has been produced and sent for one request."""

    request: EngineRequest
    sink: ResponseSink
    detok: DetokWindow
    generated: list[int] = field(default_factory=list)
    closed: bool = False
    arrival_ns: int = 0
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    kv_context: tuple[int, int, int] = (0, 0, 0)  # new, reused, total blocks on the context engine
    kv_generation: tuple[int, int, int] = (0, 0, 0)  # the same on the generation engine (latest report)

    def kv_blocks(self) -> tuple[int, int, int]:
        """KV blocks the request held on both engines: new, reused (prefix hits), total."""
        c, g = self.kv_context, self.kv_generation
        return c[0] + g[0], c[1] + g[1], c[2] + g[2]

    def finished(self) -> bool:
        return self.request.stop.finished(self.generated) is not None


def _kv_counts(perf: PerfMetrics) -> tuple[int, int, int]:
    return perf.kv_cache_alloc_new_blocks, perf.kv_cache_reused_blocks, perf.kv_cache_alloc_total_blocks


def _child_inputs(tensors: Tensors, streaming: bool) -> dict[str, np.ndarray]:
    out = {name: with_batch_dim(name, tensors[name]) for name in FORWARDED_INPUTS if name in tensors}
    out["streaming"] = np.array([[streaming]], dtype=bool)
    out["exclude_input_in_output"] = np.array([[True]], dtype=bool)
    return out


def _engine_failure(engine: str, phase: str, error: RequestError) -> RequestError:
    """Client mistakes reported by an engine stay INVALID_ARG; anything else is UNAVAILABLE."""
    if error.code is ErrorCode.INVALID_ARG:
        return error
    return EngineUnavailable(f"{phase} phase failed on engine '{engine}': {error.message}")


class Orchestrator:
    """Runs requests through the context and generation pools; one instance per model instance."""

    def __init__(self, config: OrchestratorConfig, client: EngineClient) -> None:
        self.config = config
        self.client = client
        self.context_policy: RoutingPolicy = make_policy(config.context_policy, "context_policy")
        self.generation_policy: RoutingPolicy = make_policy(config.generation_policy, "generation_policy")
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    def start(self, request: EngineRequest, tensors: Tensors, sink: ResponseSink) -> asyncio.Task[None]:
        """Serve a request in its own task; the task is kept until it ends (no GC, no leak)."""
        key = request.request_id or uuid.uuid4().hex
        while key in self.in_flight:
            key = f"{key}+"
        task = asyncio.get_running_loop().create_task(self.serve(request, tensors, sink, key))
        self.in_flight[key] = task
        task.add_done_callback(lambda _t, k=key: self.in_flight.pop(k, None))
        return task

    async def serve(self, request: EngineRequest, tensors: Tensors, sink: ResponseSink, key: str = "") -> None:
        """Never raises: every path ends in exactly one final response or error."""
        progress = _Progress(request=request, sink=sink, detok=DetokWindow(request.input_ids), arrival_ns=time.time_ns())
        try:
            await self._run(progress, tensors, key or request.request_id or uuid.uuid4().hex)
            if not progress.closed:
                self._close(progress)
        except asyncio.CancelledError:
            self._fail(progress, RequestError("request cancelled", ErrorCode.CANCELLED))
            raise
        except Exception as exc:  # noqa: BLE001 - turned into the client's typed error
            self._fail(progress, as_request_error(exc))

    async def _run(self, p: _Progress, tensors: Tensors, key: str) -> None:
        req = p.request
        engine = self.context_policy.select(self.config.context_engines, key)
        context = await self._context_phase(engine, tensors, f"{key}:ctx")
        if context.perf is not None:
            if context.perf.arrival_time_ns:  # the earlier of the two clocks' views of arrival
                p.arrival_ns = min(p.arrival_ns, context.perf.arrival_time_ns)
            p.first_scheduled_ns = context.perf.first_scheduled_time_ns
            p.kv_context = _kv_counts(context.perf)
        p.first_token_ns = time.time_ns()
        if not context.tokens:
            return  # the first token was the end token: nothing to generate
        first = context.tokens[-1]
        p.generated.append(first)
        done = context.context_phase_params is None or p.finished()
        if req.streaming:
            self._emit(p, (first,), final=done)
        if done:
            return
        engine = self.generation_policy.select(self.config.generation_engines, key)
        gen_tensors = _child_inputs(tensors, req.streaming)
        gen_tensors["context_phase_params"] = np.frombuffer(context.context_phase_params, dtype=np.uint8).reshape(1, -1)
        repeat_pending = True
        async for reply in self.client.stream(engine, gen_tensors, {"request_type": RequestType.GENERATION_ONLY.value}, f"{key}:gen"):
            if p.closed:
                continue  # drain: the engine's stream ends by itself after its final reply
            if reply.error is not None:
                raise _engine_failure(engine, "generation", reply.error)
            output = EngineOutput.from_tensors(reply.tensors or {})
            if output.perf is not None:
                p.kv_generation = _kv_counts(output.perf)
            tokens = output.tokens
            if repeat_pending and tokens:
                repeat_pending = False
                if tokens[0] == first:
                    tokens = tokens[1:]
            p.generated.extend(tokens)
            done = p.finished()
            if req.streaming and (tokens or done):
                self._emit(p, tokens, final=done)

    async def _context_phase(self, engine: str, tensors: Tensors, child_id: str) -> EngineOutput:
        params = {"request_type": RequestType.CONTEXT_ONLY.value}
        result: EngineOutput | None = None
        async for reply in self.client.stream(engine, _child_inputs(tensors, False), params, child_id):
            if reply.error is not None:
                raise _engine_failure(engine, "context", reply.error)
            if result is None:
                result = EngineOutput.from_tensors(reply.tensors or {})
        if result is None:
            raise EngineUnavailable(f"context phase on engine '{engine}' ended without a response")
        return result

    # -- responses ------------------------------------------------------------------
    def _emit(self, p: _Progress, new: tuple[int, ...] | list[int], final: bool) -> None:
        """A streaming delta: the new tokens and their detokenization window."""
        tensors = self._tensors(p, tuple(new), p.detok.window(new, final=final))
        p.closed = final
        p.sink.send(tensors, final)

    def _close(self, p: _Progress) -> None:
        """The single final response when no delta carried the final flag."""
        req = p.request
        if req.streaming:
            self._emit(p, (), final=True)
            return
        if req.exclude_input_in_output:
            body = tuple(p.generated)
            window = p.detok.window(p.generated, final=True)
        else:
            body = req.input_ids + tuple(p.generated)
            window = prompt_window(req.input_ids, p.generated)
        p.closed = True
        p.sink.send(self._tensors(p, body, window), True)

    def _fail(self, p: _Progress, error: RequestError) -> None:
        if p.closed:
            return
        p.closed = True
        try:
            p.sink.fail(error)
        except Exception:  # noqa: BLE001 - the client is gone; nothing is left to tell
            pass

    def _tensors(self, p: _Progress, body: tuple[int, ...], window: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's outputs for `body` (EngineOutput builds them) plus the detok window."""
        perf = None
        if p.request.return_perf_metrics:
            now = time.time_ns()
            new, reused, total = p.kv_blocks()
            perf = PerfMetrics(
                arrival_time_ns=p.arrival_ns,
                first_scheduled_time_ns=p.first_scheduled_ns or p.arrival_ns,
                first_token_time_ns=p.first_token_ns or now,
                last_token_time_ns=now,
                kv_cache_alloc_new_blocks=new,
                kv_cache_reused_blocks=reused,
                kv_cache_alloc_total_blocks=total,
            )
        output = EngineOutput(
            tokens=body, perf=perf, num_input_tokens=len(p.request.input_ids), num_output_tokens=len(p.generated)
        )
        out = output.tensors(p.request)
        out["detok_window"] = window.reshape(1, -1)
        return out
