"""The phases of one request: routing, the context phase, the generation phase, with
their retries, timeouts and migration.

1. the router (`orchestrator.serving.router`) picks a generation engine, then decides whether the
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
4. the request's lifecycle (`orchestrator.serving.pipeline`) sends the one final response: the last
   tokens carry the final flag when the stop rule recognises them as last, otherwise a
   closing response follows the stream.

Failures: an engine that errors, stays silent for `engine_timeout_s` or overruns a phase
timeout is reported to the router (its circuit breaker) and the phase is retried on another
engine, at most `max_retries` times: a context phase always, a generation phase while no
generated token has reached the client (a lost KV lease, NOT_FOUND, re-runs the context
phase first). A generation engine that fails after generated tokens were streamed is left
behind instead: the request migrates (`orchestrator.serving.migration`), at most `max_migrations`
times: a context phase over prompt + the tokens so far, then generation on another
generation engine, and the client's stream goes on as if nothing happened. After that the
request fails with UNAVAILABLE (`PhaseFailed`). An engine that refuses an attempt as full
(`UNAVAILABLE: overloaded: ...`, its `max_queued_requests`) is healthy: the attempt moves to
another engine within the same `max_retries`, its circuit breaker untouched; when every
engine tried was full, the client gets that `overloaded` refusal.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Awaitable, Callable, Mapping, TypeVar

import numpy as np

from orchestrator.routing.policies import RouteRequest
from orchestrator.serving.child_replies import ChildReplies
from orchestrator.serving.child_replies import PhaseFailed as _PhaseFailed
from orchestrator.serving.child_replies import engine_failure as _engine_failure
from orchestrator.serving.child_replies import retryable as _retryable
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.deadline import StallTimer
from orchestrator.serving.migration import budget_spent, continuation_tensors, migration_failed
from orchestrator.serving.progress import Progress
from orchestrator.serving.router import Phase, RouteDecision, Router
from orchestrator.telemetry.recorder import Telemetry
from orchestrator.wire.contract import FORWARDED_INPUTS, EngineOutput, PerfMetrics, RequestType, with_batch_dim
from orchestrator.wire.errors import EngineUnavailable, ErrorCode, RequestError

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


class Phases:
    """Runs one request's phases on the engines; the lifecycle around them is the Orchestrator's."""

    def __init__(
        self, config: OrchestratorConfig, router: Router, child_replies: ChildReplies, telemetry: Telemetry,
        log: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.config, self.router, self.child_replies = config, router, child_replies
        self.telemetry, self.log = telemetry, log

    async def run(self, p: Progress, tensors: Tensors, key: str) -> None:
        """Route the request, run its phases (migrating it if its generation engine fails mid-stream)."""
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
        """Tell the router (health) and the log; the caller decides about a retry. A full
        engine is neither (healthy; under a flood a line per refusal would add to the load):
        `disagg_routing_retries_total` counts the attempts it moved."""
        if failure.engine_fault:
            self.router.failure(decision)
        if failure.error.code is not ErrorCode.INVALID_ARG and not failure.overloaded:
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
            error = EngineUnavailable(
                f"{phase} phase timed out on engine '{engine}': not done within {phase}_timeout_s={timeout_s:g}"
            )
            raise _PhaseFailed(error, engine_fault=True) from None
        finally:
            timer.disarm()

    async def _context_attempt(self, p: Progress, engine: str, tensors: Tensors, child_id: str) -> EngineOutput:
        params = {"request_type": RequestType.CONTEXT_ONLY.value}
        result: EngineOutput | None = None
        async for reply in self.child_replies.replies(
            p.children, engine, "context", _child_inputs(tensors, False), params, child_id
        ):
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
                if failure.engine_fault or failure.overloaded:
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
        async with aclosing(
            self.child_replies.replies(p.children, engine, "generation", gen_tensors, params, child_id)
        ) as replies:
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
