"""The disaggregated request flow: context phase on one engine, generation on another.

For each request (all requests run concurrently, one asyncio task each):

1. the router (`orchestrator.router`) picks a generation engine, then decides whether the
   context hop pays: a prompt that is short once its cached part is subtracted, or a
   saturated context pool, runs both phases on that generation engine (conditional
   disaggregation) and skips to 4;
2. it picks a context engine; the inputs go there with `request_type=context_only`
   (non-streaming); its single response has the first token and the opaque
   `context_phase_params` blob. When streaming, the first token goes to the client at once
   (TTFT is the context phase, not the context phase plus a generation round trip);
3. unless that already finished the request, the same inputs plus the blob, unchanged, go
   to the generation engine with `request_type=generation_only`; its first reply repeats
   the first token, which is dropped;
4. exactly one final response ends it: the last tokens carry the final flag when the stop
   rule recognises them as last, otherwise a closing response follows the stream.

Failures: an engine that errors, stays silent for `engine_timeout_s` or overruns a phase
timeout is reported to the router (its circuit breaker) and the phase is retried on another
engine, at most `max_retries` times: a context phase always, a generation phase while no
generated token has reached the client (a lost KV lease, NOT_FOUND, re-runs the context
phase first). A generation engine that fails after generated tokens were streamed is left
behind instead: the request migrates (`orchestrator.migration`), at most `max_migrations`
times: a context phase over prompt + the tokens so far, then generation on another
generation engine, and the client's stream goes on as if nothing happened. After that the
client gets UNAVAILABLE as its final response.

Ending early: `stop(request_id)` (TensorRT-LLM's `stop=true`) ends a request with an empty
final response; a client's Triton cancellation (polled every `cancel_check_ms`, a bounded
number of requests per poll) ends it CANCELLED; `request_timeout_s` ends it UNAVAILABLE. Whatever the path, every child request
still open on an engine, and every KV lease a finished context phase left unpulled, gets a
`stop=true` request with its child id, so engines free the blocks at once (Triton 2.51's
BLS cannot cancel a child request; where a newer Triton can, the BLS client also does).

Every response also carries a detokenization window (`detok_window`, see
`orchestrator.detokenize`) so the stateless postprocessing step renders exact text deltas.
Errors end the request with one typed error response; nothing escapes to Triton. What a
request has produced and every answer to its client live in `orchestrator.progress`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from contextlib import aclosing
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, TypeVar

import numpy as np

from orchestrator.child_replies import ChildReplies
from orchestrator.child_replies import PhaseFailed as _PhaseFailed
from orchestrator.child_replies import engine_failure as _engine_failure
from orchestrator.child_replies import retryable as _retryable
from orchestrator.child_stops import ChildStops
from orchestrator.config import OrchestratorConfig
from orchestrator.contract import (
    FORWARDED_INPUTS,
    EngineOutput,
    EngineRequest,
    PerfMetrics,
    RequestType,
    with_batch_dim,
)
from orchestrator.deadline import StallTimer
from orchestrator.detokenize import DetokWindow
from orchestrator.engine_client import EngineClient
from orchestrator.errors import DuplicateRequest, EngineUnavailable, ErrorCode, InvalidInput, RequestError, as_request_error
from orchestrator.membership import Membership
from orchestrator.outbox import Outbox
from orchestrator.migration import budget_spent, continuation_tensors, migration_failed
from orchestrator.router import Phase, RouteDecision, Router
from orchestrator.metric_registry import MemoryRegistry
from orchestrator.progress import Progress, ResponseSink
from orchestrator.routing import RouteRequest
from orchestrator.telemetry import SPECS, RequestRecord, Telemetry

Tensors = Mapping[str, np.ndarray]
T = TypeVar("T")


def _child_id(key: str, phase: str, attempt: int) -> str:
    """A child request id per attempt: a retry is a fresh request to its engine."""
    return f"{key}:{phase}" if attempt == 0 else f"{key}:{phase}{attempt}"


def _kv_counts(perf: PerfMetrics) -> tuple[int, int, int]:
    return perf.kv_cache_alloc_new_blocks, perf.kv_cache_reused_blocks, perf.kv_cache_alloc_total_blocks


def _child_inputs(tensors: Tensors, streaming: bool) -> dict[str, np.ndarray]:
    out = {name: with_batch_dim(name, tensors[name]) for name in FORWARDED_INPUTS if name in tensors}
    out["streaming"] = np.array([[streaming]], dtype=bool)
    out["exclude_input_in_output"] = np.array([[True]], dtype=bool)
    return out


@dataclass(slots=True)
class _InFlight:
    task: asyncio.Task[None]
    progress: Progress


class Orchestrator:
    """Runs requests through the context and generation pools; one instance per model instance."""

    def __init__(
        self,
        config: OrchestratorConfig,
        client: EngineClient,
        router: Router | None = None,
        log: Callable[[str], None] = lambda message: None,
        telemetry: Telemetry | None = None,
        stub_deaths: Callable[[], Iterable[str]] | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox  # answers go out from its thread (None: from the loop, at once)
        self.forward_stop: Callable[[str], object] | None = None  # a stop for an id not held here goes on
        self.client = client
        self.router = router or Router(config)
        self.log = log
        self.telemetry = telemetry or Telemetry(MemoryRegistry(SPECS), deferred=False)
        self.router.listeners.append(
            lambda d: self.telemetry.route(d.phase.value, d.policy, d.engine, d.attempt)
        )
        self.in_flight: dict[str, _InFlight] = {}
        self.child_stops = ChildStops(client, config.stop_timeout_s, log)
        self.child_replies = ChildReplies(client, self.child_stops, config, log)
        self.membership = Membership(
            self.router, client, config, log, stub_deaths=stub_deaths, on_lost=self.child_replies.engine_lost
        )
        self._watcher: asyncio.Task[None] | None = None  # polls clients' cancellation
        self._loop: asyncio.AbstractEventLoop | None = None  # where requests run (set by start)
        self.cancelled_by_client = 0

    def state(self) -> dict[str, int]:
        """What the orchestrator holds now (exported as gauges; all zero when idle and leak-free)."""
        return {
            "in_flight_requests": len(self.in_flight),
            "child_requests": sum(len(e.progress.children) + len(e.progress.leases) for e in self.in_flight.values()),
            "stops_pending": len(self.child_stops.pending),
            "queued_responses": self.outbox.queued if self.outbox is not None else 0,
        }

    async def stops_answered(self) -> None:
        """Wait until every stop request sent so far has been answered (or timed out)."""
        await self.child_stops.answered()

    async def close(self) -> None:
        """Cancel what is in flight (each request ends CANCELLED, its children are stopped), stop
        the membership task, close the engine client's connections (remote engines)."""
        tasks = [entry.task for entry in self.in_flight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()
        await self.stops_answered()
        await self.membership.stop()
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()

    def close_soon(self) -> None:
        """Schedule close() on the requests' loop from any thread (Triton's finalize); never
        waits: finalize may run on that very loop's thread, where waiting would deadlock."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.close(), loop)

    def start(self, request: EngineRequest, tensors: Tensors, sink: ResponseSink) -> asyncio.Task[None]:
        """Serve a request in its own task; the task is kept until it ends (no GC, no leak).

        Raises DuplicateRequest when a request with the same id is in flight: ids name
        requests for `stop` and for their child requests on engines, so they must be unique.
        """
        loop = self._loop = asyncio.get_running_loop()
        self.membership.ensure_started()
        key = request.request_id or uuid.uuid4().hex
        if key in self.in_flight:
            raise DuplicateRequest(
                f"request id '{key}' is already in flight: give every in-flight request its own id "
                "(or none), or send stop=true with that id to end the running one"
            )
        progress = self._progress(request, sink)
        task = loop.create_task(self._serve(progress, tensors, key))
        self.in_flight[key] = _InFlight(task, progress)
        task.add_done_callback(lambda t, k=key, p=progress: self._task_done(t, k, p))
        if self.config.cancel_check_ms > 0 and (self._watcher is None or self._watcher.done()):
            self._watcher = loop.create_task(self._watch_cancellations())
        return task

    def _progress(self, request: EngineRequest, sink: ResponseSink) -> Progress:
        p = Progress(request=request, sink=sink, detok=DetokWindow(request.input_ids), arrival_ns=time.time_ns())
        if self.outbox is not None:
            p.outbox = self.outbox.channel(p.flush)
        return p

    def _task_done(self, task: asyncio.Task[None], key: str, p: Progress) -> None:
        """Forget the request; if it never answered, answer now. A task cancelled before its
        first step (a stop right behind its request) never ran `_serve`, so nothing else would."""
        self.in_flight.pop(key, None)
        if p.closed:
            return
        if task.cancelled():
            self._ended_early(p, StallTimer(0))
        else:  # _serve always answers; this is the net under a bug, never a silent hang
            p.fail(RequestError("bug: the request ended without a response", ErrorCode.INTERNAL))
        self._release(p)
        self.telemetry.request_done(self._record(p, key))

    def stop(self, request: EngineRequest, sink: ResponseSink) -> bool:
        """TensorRT-LLM's `stop=true`: end the in-flight request with this request's id with an
        empty final response, and answer the stop request itself with one. Returns whether one
        was running here (an unknown id is not an error: that request may just have finished,
        or run on a sibling instance, which `forward_stop` then tells)."""
        if not request.request_id:
            raise InvalidInput("stop=true needs the id of the request to stop: send it as this request's id")
        found = self.end(request.request_id)
        self.telemetry.stop("here", found)
        if not found and self.forward_stop is not None:
            self.forward_stop(request.request_id)
            self.telemetry.stop("forwarded", False)
        p = Progress(request=request, sink=sink, detok=DetokWindow(()), closed=True)
        sink.send(p.tensors((), p.detok.window((), final=True)), True)
        return found

    def end_for_sibling(self, request_id: str) -> bool:
        """A stop a sibling instance forwarded (orchestrator/siblings.py)."""
        found = self.end(request_id)
        self.telemetry.stop("from_sibling", found)
        return found

    def end(self, request_id: str) -> bool:
        """End the in-flight request `request_id` as stopped (empty final response); a stop
        request's work, also when a sibling instance forwarded it. Returns whether it ran here."""
        entry = self.in_flight.get(request_id)
        if entry is None or entry.progress.closed:
            return False
        entry.progress.ending = "stop"
        entry.task.cancel()
        return True

    async def _watch_cancellations(self) -> None:
        """Poll in-flight requests' Triton cancellation while any is in flight.

        Each poll is an IPC round trip from the python backend stub (measured 50-90 us), so
        at most `cancel_checks_per_tick` requests are asked per `cancel_check_ms`, in turn:
        with N in flight a cancellation is seen within ceil(N / that) intervals.
        """
        turn: deque[str] = deque()
        while self.in_flight:
            await asyncio.sleep(self.config.cancel_check_ms / 1e3)
            for _ in range(min(self.config.cancel_checks_per_tick, len(self.in_flight))):
                if not turn:
                    turn.extend(self.in_flight)
                entry = self.in_flight.get(turn.popleft())
                if entry is not None:
                    self._check_cancelled(entry)

    def _check_cancelled(self, entry: _InFlight) -> None:
        p = entry.progress
        cancelled = getattr(p.sink, "cancelled", None)
        if p.ending or p.closed or cancelled is None:
            return
        try:
            gone = bool(cancelled())
        except Exception:  # noqa: BLE001 - a sink that cannot tell counts as a departed client
            gone = True
        if gone:
            p.ending = "client"
            self.cancelled_by_client += 1
            entry.task.cancel()

    async def serve(self, request: EngineRequest, tensors: Tensors, sink: ResponseSink, key: str = "") -> None:
        """Serve one request on the caller's task (start() is the usual way); never raises."""
        progress = self._progress(request, sink)
        await self._serve(progress, tensors, key or request.request_id or uuid.uuid4().hex)

    async def _serve(self, progress: Progress, tensors: Tensors, key: str) -> None:
        """Every path ends in exactly one final response or error, and releases every child."""
        deadline = StallTimer(self.config.request_timeout_s)
        try:
            if deadline.timeout_s:
                deadline.arm()
            await self._run(progress, tensors, key)
            if not progress.closed:
                progress.close()
        except asyncio.CancelledError:
            if not self._ended_early(progress, deadline):
                raise  # cancelled from outside (shutdown): the task ends cancelled, as asked
        except _PhaseFailed as failure:
            error = failure.error
            if error.code is ErrorCode.NOT_FOUND:  # retries spent: to the client, an unavailable backend
                error = EngineUnavailable(f"the context phase's KV cache was lost and retries are spent: {error.message}")
            progress.fail(error)
        except Exception as exc:  # noqa: BLE001 - turned into the client's typed error
            progress.fail(as_request_error(exc))
        finally:
            deadline.disarm()
            self._release(progress)
            self.telemetry.request_done(self._record(progress, key))

    def _record(self, p: Progress, key: str) -> RequestRecord:
        return RequestRecord(
            request_id=key, streaming=p.request.streaming, outcome=p.outcome, path=p.path,
            context_engine=p.context_engine, generation_engine=p.generation_engine,
            prompt_tokens=len(p.request.input_ids), output_tokens=len(p.generated), retries=p.retries,
            arrival_ns=p.arrival_ns, context_sent_ns=p.context_sent_ns, context_done_ns=p.context_done_ns,
            generation_sent_ns=p.generation_sent_ns, first_token_ns=p.first_token_ns, last_token_ns=p.last_token_ns,
            end_ns=time.time_ns(), migrations=tuple(p.migrations),
        )  # fmt: skip

    def _ended_early(self, p: Progress, deadline: StallTimer) -> bool:
        """The request's task was cancelled: say why in the one final response; returns whether
        we cancelled it ourselves (stop, client cancellation, deadline)."""
        if p.ending == "stop":
            p.outcome = "stopped"
            if not p.closed:
                p.close()
            return True
        if deadline.fired:
            deadline.absorb()
            p.outcome = "timed_out"
            p.fail(EngineUnavailable(
                f"request timed out: no result within request_timeout_s={deadline.timeout_s:g} "
                f"(it was in the {p.phase} phase)"
            ))  # fmt: skip
            return True
        if p.ending == "client":
            p.fail(RequestError("request cancelled by the client", ErrorCode.CANCELLED))
            return True
        p.outcome = "cancelled"
        p.fail(RequestError("request cancelled: the orchestrator is shutting down", ErrorCode.CANCELLED))
        return False

    def _release(self, p: Progress) -> None:
        """Stop whatever the request still holds on engines: open children, unpulled leases."""
        for child_id, engine in (*p.children.items(), *p.leases.items()):
            self.child_stops.send(engine, child_id)
        p.children.clear()
        p.leases.clear()

    async def _run(self, p: Progress, tensors: Tensors, key: str) -> None:
        req = p.request
        p.phase = "routing"
        route = self.router.request(key, req.input_ids, req.stop.max_new_tokens)
        generation = self.router.pick(Phase.GENERATION, route)
        local = self.router.local_reason(generation, route)
        self.router.count_path(local)
        self.telemetry.path(local)
        p.path = "disaggregated" if local is None else "local"
        try:
            await self._phases(p, tensors, route, generation, local is None, key, [])
        except _PhaseFailed as failure:
            if not failure.mid_stream:
                raise
            await self._migrate(p, tensors, key, failure)

    async def _phases(
        self, p: Progress, tensors: Tensors, route: RouteRequest, generation: RouteDecision, disaggregated: bool,
        key: str, tried: list[str],
    ) -> None:  # fmt: skip
        """Context then generation (or both on the generation engine); `tried`: generation engines to avoid."""
        req = p.request
        if not disaggregated:  # conditional disaggregation: both phases on the generation engine
            await self._generation(p, tensors, route, generation, None, key, tried)
            return
        p.phase = "context"
        context = await self._context(p, tensors, route, key)
        if not context.tokens:
            return  # the first token was the end token: nothing to generate
        first = context.tokens[-1]
        p.generated.append(first)
        done = context.context_phase_params is None or p.finished()
        if req.streaming:
            p.emit((first,), final=done)
        if done:
            return
        p.phase = "generation"
        await self._generation(p, tensors, route, generation, context.context_phase_params, key, tried)

    # -- migration -----------------------------------------------------------------------
    async def _migrate(self, p: Progress, tensors: Tensors, key: str, failure: _PhaseFailed) -> None:
        """Continue a request whose generation engine failed mid-stream on other engines, at
        most `max_migrations` times; the client's stream goes on where it stopped.

        A failed migration, or a failure with the budget spent, ends the request with the
        mid-stream failure's UNAVAILABLE, its message saying what was tried.
        """
        limit = self.config.max_migrations
        while True:
            if len(p.migrations) >= limit:
                failure.error.message += budget_spent(p.migrations, limit)
                raise failure
            p.migrations.append(failure.mid_stream)
            number = len(p.migrations)
            self.log(
                f"request {key}: generation engine {failure.mid_stream} failed after {len(p.generated)} tokens were "
                f"streamed; migration {number} of {limit}: {failure.error.message}"
            )
            try:
                await self._continuation(p, tensors, f"{key}:m{number}", failure.mid_stream)
                return
            except _PhaseFailed as again:
                if again.mid_stream:  # the continuation streamed tokens, then its engine failed too
                    failure = again
                    continue
                why = again.error.message
            except RequestError as exc:  # e.g. no other generation engine to go to
                why = exc.message
            error = EngineUnavailable(failure.error.message + migration_failed(number, limit, why))
            raise _PhaseFailed(error, engine_fault=False) from None

    async def _continuation(self, p: Progress, tensors: Tensors, key: str, failed: str) -> None:
        """One migration: prompt + generated tokens through both phases, avoiding the failed engine.

        The request's record keeps its first context phase (TTFT and the context phase are
        the client's); the continuation's KV counts replace the earlier ones in perf outputs.
        """
        req = p.request
        cont = continuation_tensors(tensors, req, p.generated)
        route = self.router.request(key, req.input_ids + tuple(p.generated), req.stop.max_new_tokens - len(p.generated))
        p.phase = "routing"
        generation = self.router.pick(Phase.GENERATION, route, [failed])
        disaggregated = self.router.local_reason(generation, route) is None
        first_context = p.context_engine, p.context_sent_ns, p.context_done_ns
        try:
            await self._phases(p, cont, route, generation, disaggregated, key, [failed])
        finally:
            p.context_engine, p.context_sent_ns, p.context_done_ns = first_context

    # -- context phase -------------------------------------------------------------------
    async def _context(self, p: Progress, tensors: Tensors, route: RouteRequest, key: str) -> EngineOutput:
        """The context phase, retried on other context engines when one fails."""
        tried: list[str] = []
        last: _PhaseFailed | None = None
        for attempt in range(self.config.max_retries + 1):
            decision = self._pick(Phase.CONTEXT, route, tried, attempt, last)
            tried.append(decision.engine)
            p.context_engine, p.context_sent_ns, p.retries = decision.engine, time.time_ns(), p.retries + (attempt > 0)
            try:
                with self.router.track(decision, route.prompt_tokens):
                    attempt_run = self._context_attempt(p, decision.engine, tensors, _child_id(key, "ctx", attempt))
                    context = await self._timed(attempt_run, "context", decision.engine, self.config.context_timeout_s)
            except _PhaseFailed as failure:
                self._failed(decision, failure)
                if not _retryable(failure) or attempt == self.config.max_retries:
                    raise
                last = failure
                continue
            self.router.success(decision)
            self._note_context(p, context)
            return context
        raise AssertionError("unreachable")  # the loop returns or raises

    def _failed(self, decision: RouteDecision, failure: _PhaseFailed) -> None:
        """Tell the router (health) and the log; the caller decides about a retry."""
        if failure.engine_fault:
            self.router.failure(decision)
        if failure.error.code is not ErrorCode.INVALID_ARG:
            self.log(
                f"request {decision.request_id}: {decision.phase.value} attempt {decision.attempt} on engine "
                f"{decision.engine} failed ({failure.error.code.value}): {failure.error.message}"
            )

    def _pick(
        self, phase: Phase, route: RouteRequest, tried: list[str], attempt: int, last: _PhaseFailed | None
    ) -> RouteDecision:
        """The next engine for an attempt; with none left, the last engine's error is the answer."""
        try:
            return self.router.pick(phase, route, tried, attempt)
        except EngineUnavailable:
            if last is not None:
                raise last from None
            raise

    async def _timed(self, attempt: Awaitable[T], phase: str, engine: str, timeout_s: float) -> T:
        """One phase attempt bounded by its phase timeout (0: none); overrunning is the engine's fault."""
        if not timeout_s:
            return await attempt
        timer = StallTimer(timeout_s)
        timer.arm()
        try:
            return await attempt
        except asyncio.CancelledError:
            if not timer.fired:
                raise
            timer.absorb()
            error = EngineUnavailable(f"{phase} phase timed out on engine '{engine}': not done within {phase}_timeout_s={timeout_s:g}")
            raise _PhaseFailed(error, engine_fault=True) from None
        finally:
            timer.disarm()

    async def _context_attempt(self, p: Progress, engine: str, tensors: Tensors, child_id: str) -> EngineOutput:
        params = {"request_type": RequestType.CONTEXT_ONLY.value}
        result: EngineOutput | None = None
        async for reply in self.child_replies.replies(p.children, engine, "context", _child_inputs(tensors, False), params, child_id):
            if reply.error is not None:
                raise _engine_failure(engine, "context", reply.error)
            if result is None:
                result = EngineOutput.from_tensors(reply.tensors or {})
        if result is None:
            raise _PhaseFailed(EngineUnavailable(f"context phase on engine '{engine}' ended without a response"), True)
        if result.context_phase_params is not None:
            p.leases[child_id] = engine  # its KV waits there until the generation engine pulls it
        return result

    def _note_context(self, p: Progress, context: EngineOutput) -> None:
        if context.perf is not None:
            if context.perf.arrival_time_ns:  # the earlier of the two clocks' views of arrival
                p.arrival_ns = min(p.arrival_ns, context.perf.arrival_time_ns)
            if not p.first_scheduled_ns:
                p.first_scheduled_ns = context.perf.first_scheduled_time_ns
            p.kv_context = _kv_counts(context.perf)
        p.context_done_ns = time.time_ns()
        if not p.first_token_ns:
            p.first_token_ns = p.last_token_ns = p.context_done_ns

    # -- generation phase (or both phases, without a blob) -----------------------------------
    async def _generation(
        self, p: Progress, tensors: Tensors, route: RouteRequest, decision: RouteDecision, blob: bytes | None, key: str,
        tried: list[str],
    ) -> None:  # fmt: skip
        """Generation, retried on other engines while no generated token reached the client.

        When the KV lease is gone (NOT_FOUND), the context phase runs again for a new blob.
        A failure after generated tokens were streamed is marked `mid_stream` for `_migrate`.
        """
        tried = list(tried)
        last: _PhaseFailed | None = None
        sent_before = p.sent
        keep = len(p.generated)  # what came before this phase: a retry starts from there again
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                decision = self._pick(Phase.GENERATION, route, tried, attempt, last)
                p.retries += 1
            p.generation_engine, p.generation_sent_ns = decision.engine, time.time_ns()
            try:
                with self.router.track(decision, route.prompt_tokens + route.max_tokens):
                    child_id = _child_id(key, "gen", attempt)
                    migrated = bool(p.migrations)
                    attempt_run = self._generation_attempt(p, tensors, decision.engine, blob, child_id, migrated)
                    await self._timed(attempt_run, "generation", decision.engine, self.config.generation_timeout_s)
            except _PhaseFailed as failure:
                self._failed(decision, failure)
                if failure.engine_fault:
                    tried.append(decision.engine)
                if not _retryable(failure) or attempt == self.config.max_retries or p.sent != sent_before:
                    if p.sent != sent_before and _retryable(failure):
                        failure.mid_stream = decision.engine
                    raise
                last = failure
                p.generated = p.generated[:keep]
                if failure.error.code is ErrorCode.NOT_FOUND and blob is not None:
                    p.leases.clear()  # gone already
                    p.phase = "context"
                    blob = await self._rerun_context(p, tensors, route, key, p.generated[-1])
                    p.phase = "generation"
                continue
            self.router.success(decision)
            return

    async def _rerun_context(self, p: Progress, tensors: Tensors, route: RouteRequest, key: str, first: int) -> bytes:
        context = await self._context(p, tensors, route, f"{key}:again")
        if not context.tokens or context.tokens[-1] != first or context.context_phase_params is None:
            raise EngineUnavailable("the context phase, run again after its KV cache was lost, gave a different result")
        return context.context_phase_params

    async def _generation_attempt(
        self, p: Progress, tensors: Tensors, engine: str, blob: bytes | None, child_id: str, continuation: bool = False
    ) -> None:
        """One generation child; `continuation`: a migrated request's, whose engine sees only
        its own part of the output (a stop word across the cut is ours to find, and ends it)."""
        req = p.request
        gen_tensors = _child_inputs(tensors, req.streaming)
        params: dict[str, str] = {}
        if blob is not None:
            gen_tensors["context_phase_params"] = np.frombuffer(blob, dtype=np.uint8).reshape(1, -1)
            params["request_type"] = RequestType.GENERATION_ONLY.value
        first = p.generated[-1] if blob is not None else None
        repeat_pending = blob is not None  # the generation engine repeats the context's first token
        async with aclosing(self.child_replies.replies(p.children, engine, "generation", gen_tensors, params, child_id)) as replies:
            async for reply in replies:
                if p.closed:
                    if continuation:
                        break  # its engine may not know the request is done: aclosing stops the child
                    continue  # drain: the engine's stream ends by itself after its final reply
                if reply.error is not None:
                    raise _engine_failure(engine, "generation", reply.error)
                p.leases.clear()  # a reply means the KV arrived: the context engine has freed it
                output = EngineOutput.from_tensors(reply.tensors or {})
                if output.perf is not None:
                    p.kv_generation = _kv_counts(output.perf)
                    if blob is None and not p.first_scheduled_ns:
                        p.first_scheduled_ns = output.perf.first_scheduled_time_ns
                tokens = output.tokens
                if repeat_pending and tokens:
                    repeat_pending = False
                    if tokens[0] == first:
                        tokens = tokens[1:]
                if tokens:
                    p.last_token_ns = time.time_ns()
                    if not p.first_token_ns:
                        p.first_token_ns = p.last_token_ns
                p.generated.extend(tokens)
                done = p.finished()
                if req.streaming and (tokens or done):
                    p.emit(tokens, final=done)
