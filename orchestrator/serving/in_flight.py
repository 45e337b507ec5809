"""The requests in flight on one orchestrator instance, and how each ends early.

Why apart from the request flow (`pipeline.py`): a request's id is how `stop=true`, a
sibling's forwarded stop and its child requests find it, so the table of ids in flight,
the `max_in_flight` bound, and every way a request's task is cancelled on purpose (stop,
the client's Triton cancellation, the deadline) live together here; `pipeline.py` only
serves a request and settles what it held.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.deadline import StallTimer
from orchestrator.serving.progress import Progress, ResponseSink
from orchestrator.telemetry.recorder import RequestRecord, Telemetry
from orchestrator.text.detokenize import DetokWindow
from orchestrator.wire.contract import EngineRequest
from orchestrator.wire.errors import (
    DuplicateRequest,
    EngineUnavailable,
    ErrorCode,
    InvalidInput,
    Overloaded,
    RequestError,
)


@dataclass(slots=True)
class Entry:
    """One request in flight: the task serving it and its progress."""

    task: asyncio.Task[None]
    progress: Progress


class InFlight:
    """The in-flight table of one orchestrator instance, keyed by request id.

    `record` turns a request's progress into its telemetry record, `release` stops what it
    still holds on engines (both the pipeline's); used when a task ends without answering.
    """

    def __init__(
        self,
        config: OrchestratorConfig,
        telemetry: Telemetry,
        record: Callable[[Progress, str], RequestRecord],
        release: Callable[[Progress], None],
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self._record = record
        self._release = release
        self.entries: dict[str, Entry] = {}
        self._watcher: asyncio.Task[None] | None = None  # polls clients' cancellation
        self.cancelled_by_client = 0

    def check(self, request: EngineRequest, sink: ResponseSink, key: str) -> None:
        """Raises DuplicateRequest when `key` is in flight, Overloaded (counted, logged) when
        `max_in_flight` requests are; nothing is kept for a refused request."""
        if key in self.entries:
            raise DuplicateRequest(
                f"request id '{key}' is already in flight: give every in-flight request its own id "
                "(or none), or send stop=true with that id to end the running one"
            )
        limit = self.config.max_in_flight
        if limit and len(self.entries) >= limit:
            raise self._refuse(request, sink, key, limit)

    def _refuse(self, request: EngineRequest, sink: ResponseSink, key: str, limit: int) -> Overloaded:
        """The refusal of a request over `max_in_flight`, counted and logged (outcome overloaded);
        the caller raises it. Nothing is kept: no task, no progress, no child request."""
        now = time.time_ns()
        p = Progress(request=request, sink=sink, detok=DetokWindow(()), arrival_ns=now, outcome="overloaded")
        self.telemetry.rejected("overloaded", self._record(p, key))
        return Overloaded(
            f"this orchestrator instance already serves {len(self.entries)} requests (max_in_flight={limit}); "
            "retry later, or raise the orchestrator parameter max_in_flight (each instance counts its own)"
        )

    def add(self, key: str, task: asyncio.Task[None], progress: Progress) -> None:
        """Keep the request until its task ends (no GC, no leak); poll cancellations meanwhile."""
        self.entries[key] = Entry(task, progress)
        task.add_done_callback(functools.partial(self._task_done, key=key, p=progress))
        if self.config.cancel_check_ms > 0 and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch_cancellations())

    def _task_done(self, task: asyncio.Task[None], key: str, p: Progress) -> None:
        """Forget the request; if it never answered, answer now. A task cancelled before its
        first step (a stop right behind its request) never ran `_serve`, so nothing else would."""
        self.entries.pop(key, None)
        if p.closed:
            return
        if task.cancelled():
            ended_early(p, StallTimer(0))
        else:  # _serve always answers; this is the net under a bug, never a silent hang
            p.fail(RequestError("bug: the request ended without a response", ErrorCode.INTERNAL))
        self._release(p)
        self.telemetry.request_done(self._record(p, key))

    async def close(self) -> None:
        """Cancel every request's task (each ends CANCELLED) and wait for them; stop polling."""
        tasks = [entry.task for entry in self.entries.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()

    def stop(self, request: EngineRequest, sink: ResponseSink, forward: Callable[[str], object] | None) -> bool:
        """A `stop=true` request: end the in-flight request with its id, answer the stop request
        with one empty final response, and pass an id not held here to `forward` (siblings)."""
        if not request.request_id:
            raise InvalidInput("stop=true needs the id of the request to stop: send it as this request's id")
        found = self.end(request.request_id)
        self.telemetry.stop("here", found)
        if not found and forward is not None:
            forward(request.request_id)
            self.telemetry.stop("forwarded", False)
        p = Progress(request=request, sink=sink, detok=DetokWindow(()), closed=True)
        sink.send(p.tensors((), p.detok.window((), final=True)), True)
        return found

    def end_for_sibling(self, request_id: str) -> bool:
        """A stop a sibling instance forwarded (orchestrator/serving/siblings.py)."""
        found = self.end(request_id)
        self.telemetry.stop("from_sibling", found)
        return found

    def end(self, request_id: str) -> bool:
        """End the in-flight request `request_id` as stopped (empty final response); returns
        whether it ran here."""
        entry = self.entries.get(request_id)
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
        while self.entries:
            await asyncio.sleep(self.config.cancel_check_ms / 1e3)
            for _ in range(min(self.config.cancel_checks_per_tick, len(self.entries))):
                if not turn:
                    turn.extend(self.entries)
                entry = self.entries.get(turn.popleft())
                if entry is not None:
                    self._check_cancelled(entry)

    def _check_cancelled(self, entry: Entry) -> None:
        p = entry.progress
        cancelled = getattr(p.sink, "cancelled", None)
        if p.ending or p.closed or cancelled is None:
            return
        try:
            gone = bool(cancelled())
        except Exception:
            gone = True
        if gone:
            p.ending = "client"
            self.cancelled_by_client += 1
            entry.task.cancel()


def ended_early(p: Progress, deadline: StallTimer) -> bool:
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
