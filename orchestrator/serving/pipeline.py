"""A request's lifecycle in the orchestrator: start, the one final answer, ending early.

All requests run concurrently, one asyncio task each; what a request does on the engines
(routing, the context and generation phases, retries, migration) is `orchestrator.serving.phases`.
This module makes sure each request ends exactly once and settles what it held; the table
of requests in flight and the ways one ends early are `orchestrator.serving.in_flight`.

Ending early: `stop(request_id)` (TensorRT-LLM's `stop=true`) ends a request with an empty
final response (a stop for an id held by a sibling instance is forwarded there); a client's
Triton cancellation (polled every `cancel_check_ms`, a bounded number of requests per poll)
ends it CANCELLED; `request_timeout_s` ends it UNAVAILABLE. Whatever the path, every child
request still open on an engine, and every KV lease a finished context phase left
unpulled, gets a `stop=true` request with its child id, so engines free the blocks at once
(Triton 2.51's BLS cannot cancel a child request; where a newer Triton can, the BLS client
also does).

Every response also carries a detokenization window (`detok_window`, see
`orchestrator.text.detokenize`) so the stateless postprocessing step renders exact text deltas.
Errors end the request with one typed error response; nothing escapes to Triton. What a
request has produced and every answer to its client live in `orchestrator.serving.progress`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable, Iterable, Mapping

import numpy as np

from orchestrator.clients.engine_client import EngineClient
from orchestrator.runtime.outbox import Outbox
from orchestrator.serving.child_replies import ChildReplies
from orchestrator.serving.child_replies import PhaseFailed as _PhaseFailed
from orchestrator.serving.child_stops import ChildStops
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.deadline import StallTimer
from orchestrator.serving.in_flight import Entry, InFlight, ended_early
from orchestrator.serving.membership import Membership
from orchestrator.serving.phases import Phases
from orchestrator.serving.progress import Progress, ResponseSink
from orchestrator.serving.router import Router
from orchestrator.telemetry.recorder import SPECS, RequestRecord, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.text.detokenize import DetokWindow
from orchestrator.wire.contract import EngineRequest
from orchestrator.wire.errors import EngineUnavailable, ErrorCode, as_request_error

Tensors = Mapping[str, np.ndarray]


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
        self.router.listeners.append(lambda d: self.telemetry.route(d.phase.value, d.policy, d.engine, d.attempt))
        self.requests = InFlight(config, self.telemetry, self._record, self._release)  # by id; ending early
        self.child_stops = ChildStops(client, config.stop_timeout_s, log)
        self.child_replies = ChildReplies(client, self.child_stops, config, log)
        self.phases = Phases(config, self.router, self.child_replies, self.telemetry, log)
        self.membership = Membership(
            self.router, client, config, log, stub_deaths=stub_deaths, on_lost=self.child_replies.engine_lost
        )
        self._loop: asyncio.AbstractEventLoop | None = None  # where requests run (set by start)

    @property
    def in_flight(self) -> dict[str, Entry]:
        """The requests in flight here, by id (the table `self.requests` keeps)."""
        return self.requests.entries

    @property
    def cancelled_by_client(self) -> int:
        """Requests ended because their client cancelled them (Triton cancellation)."""
        return self.requests.cancelled_by_client

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
        await self.requests.close()
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
        Raises Overloaded, having counted and logged the refusal, when `max_in_flight` requests
        are in flight here: answered at once, nothing started (stop=true never comes here).
        """
        loop = self._loop = asyncio.get_running_loop()
        self.membership.ensure_started()
        key = request.request_id or uuid.uuid4().hex
        self.requests.check(request, sink, key)
        progress = self._progress(request, sink)
        task = loop.create_task(self._serve(progress, tensors, key))
        self.requests.add(key, task, progress)
        return task

    def _progress(self, request: EngineRequest, sink: ResponseSink) -> Progress:
        p = Progress(request=request, sink=sink, detok=DetokWindow(request.input_ids), arrival_ns=time.time_ns())
        if self.outbox is not None:
            p.outbox = self.outbox.channel(p.flush)
        return p

    def stop(self, request: EngineRequest, sink: ResponseSink) -> bool:
        """TensorRT-LLM's `stop=true`: end the in-flight request with this request's id with an
        empty final response, and answer the stop request itself with one. Returns whether one
        was running here (an unknown id is not an error: that request may just have finished,
        or run on a sibling instance, which `forward_stop` then tells)."""
        return self.requests.stop(request, sink, self.forward_stop)

    def end_for_sibling(self, request_id: str) -> bool:
        """A stop a sibling instance forwarded (orchestrator/serving/siblings.py)."""
        return self.requests.end_for_sibling(request_id)

    def end(self, request_id: str) -> bool:
        """End the in-flight request `request_id` as stopped (empty final response); a stop
        request's work, also when a sibling instance forwarded it. Returns whether it ran here."""
        return self.requests.end(request_id)

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
            await self.phases.run(progress, tensors, key)
            if not progress.closed:
                progress.close()
        except asyncio.CancelledError:
            if not ended_early(progress, deadline):
                raise  # cancelled from outside (shutdown): the task ends cancelled, as asked
        except _PhaseFailed as failure:
            error = failure.error
            if error.code is ErrorCode.NOT_FOUND:  # retries spent: to the client, an unavailable backend
                error = EngineUnavailable(
                    f"the context phase's KV cache was lost and retries are spent: {error.message}"
                )
            if failure.overloaded:  # every engine it tried was full; the message says so
                self.telemetry.rejected("engines_overloaded")
            progress.fail(error)
        except Exception as exc:
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

    def _release(self, p: Progress) -> None:
        """Stop whatever the request still holds on engines: open children, unpulled leases."""
        for child_id, engine in (*p.children.items(), *p.leases.items()):
            self.child_stops.send(engine, child_id)
        p.children.clear()
        p.leases.clear()
