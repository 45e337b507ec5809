"""One child request's replies, bounded in time; what a failed phase attempt is.

Every child stream (a context phase, a generation phase) is read through `ChildReplies`:
the first reply is awaited at most `engine_timeout_s`, each later one at most
`next_reply_timeout_s` (a silent engine is a failed one; over BLS, Triton 2.51 can lose an
engine's error that follows streamed replies). A child left before its engine ended it
(timeout, cancellation, stop, our error) is stopped on its engine at once, so the engine
frees its blocks now, not at its end. When an engine's stub process dies, `engine_lost`
fails every wait on it at once instead of after those bounds (Triton 2.51 never ends a
dead stub's requests).
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator, Callable, Mapping

import numpy as np

from orchestrator.clients.engine_client import EngineClient, EngineReply
from orchestrator.serving.child_stops import ChildStops
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.deadline import StallTimer
from orchestrator.wire.errors import EngineUnavailable, ErrorCode, RequestError, is_overloaded


class PhaseFailed(Exception):
    """A phase attempt failed; `engine_fault` says whether the engine is to blame (health).

    `mid_stream` names the generation engine when the failure came after generated tokens
    reached the client: no retry can hide it, a migration can. `overloaded`: the engine
    refused it as full (`max_queued_requests`); it is healthy, another engine may take it.
    """

    def __init__(self, error: RequestError, engine_fault: bool, overloaded: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.engine_fault = engine_fault
        self.overloaded = overloaded
        self.mid_stream = ""


def engine_failure(engine: str, phase: str, error: RequestError) -> PhaseFailed:
    """Client mistakes (INVALID_ARG) and cancellations pass through as they are; KV that is
    gone (NOT_FOUND) is nobody's fault here; a full engine (`overloaded:`) is not broken: its
    refusal passes through, retried elsewhere with its circuit breaker left alone (tripping
    it would keep a busy engine out for its backoff and push its load onto the others);
    anything else is the engine's: UNAVAILABLE."""
    if error.code in (ErrorCode.INVALID_ARG, ErrorCode.CANCELLED, ErrorCode.NOT_FOUND):
        return PhaseFailed(error, engine_fault=False)
    if is_overloaded(error):
        return PhaseFailed(error, engine_fault=False, overloaded=True)
    return PhaseFailed(
        EngineUnavailable(f"{phase} phase failed on engine '{engine}': {error.message}"), engine_fault=True
    )


def retryable(failure: PhaseFailed) -> bool:
    return failure.engine_fault or failure.overloaded or failure.error.code is ErrorCode.NOT_FOUND


class ChildReplies:
    """Reads child streams with their time bounds; knows which waits are on which engine."""

    def __init__(
        self, client: EngineClient, stops: ChildStops, config: OrchestratorConfig, log: Callable[[str], None]
    ) -> None:
        self.client, self.stops, self.log = client, stops, log
        self.first_reply_s = config.engine_timeout_s
        self.next_reply_s = config.next_reply_s
        self._waiting: dict[str, set[StallTimer]] = {}  # engine -> the reply waits on it now

    def engine_lost(self, engine: str, why: str) -> int:
        """`engine` lost every request it held (its stub process died): fail each attempt
        waiting on it now, as a failed attempt (retried elsewhere while no generated token was
        streamed, else migrated), instead of after the time bounds. Returns how many."""
        timers = list(self._waiting.get(engine, ()))
        for timer in timers:
            timer.fire_now(why)
        if timers:
            self.log(f"engine {engine} lost its requests ({why}): {len(timers)} attempt(s) failed over")
        return len(timers)

    async def replies(
        self, children: dict[str, str], engine: str, phase: str, tensors: Mapping[str, np.ndarray],
        params: Mapping[str, str], child_id: str,
    ) -> AsyncGenerator[EngineReply, None]:  # fmt: skip
        """The engine's replies to one child; `children` (the request's open children) holds
        it while it is open. Raises PhaseFailed when a bound passes or the engine is lost."""
        stream = self.client.stream(engine, tensors, params, child_id)
        timer = StallTimer(self.first_reply_s)
        children[child_id] = engine
        waiting = self._waiting.setdefault(engine, set())
        waiting.add(timer)
        ended = False  # the engine ended the child itself (final reply or error)
        try:
            while True:
                timer.arm()
                try:
                    reply = await anext(stream)
                except StopAsyncIteration:
                    ended = True
                    return
                except asyncio.CancelledError:
                    if not timer.fired:
                        raise
                    timer.absorb()
                    why = timer.reason or f"timed out on engine '{engine}': no reply in {timer.timeout_s:g}s"
                    error = EngineUnavailable(
                        f"{phase} phase {why}"
                        if not timer.reason
                        else f"{phase} phase failed on engine '{engine}': {why}"
                    )
                    raise PhaseFailed(error, engine_fault=True) from None
                finally:
                    timer.disarm()
                timer.timeout_s = self.next_reply_s  # the stream is running: a step, not a prefill
                ended = reply.error is not None  # an error is always an engine's last word
                yield reply
        finally:
            waiting.discard(timer)
            if not waiting:
                self._waiting.pop(engine, None)
            children.pop(child_id, None)
            if not ended:
                self.stops.send(engine, child_id)
            await stream.aclose()
