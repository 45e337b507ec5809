"""One client request's progress and its answers to the client.

`Progress` is the per-request state the orchestrator keeps (tokens generated, children and
leases still open on engines, timings for metrics) and the only place that writes to the
request's `ResponseSink`: streaming deltas with their detokenization window, the single
closing response, or a typed error. Exactly one of its calls carries the final flag.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from orchestrator.runtime.outbox import Channel
from orchestrator.text.detokenize import DetokWindow, prompt_window
from orchestrator.wire.contract import EngineOutput, EngineRequest, PerfMetrics
from orchestrator.wire.errors import ErrorCode, RequestError, is_overloaded


@dataclass(frozen=True, slots=True)
class _Delta:
    """Streamed tokens; `count`: the request's generated tokens when they were emitted."""

    tokens: tuple[int, ...]
    final: bool
    count: int


class _Whole:
    """The non-streaming answer: every generated token (or prompt + them), final."""


_WHOLE = _Whole()
_Answer = _Delta | _Whole | RequestError


class ResponseSink(Protocol):
    """One client request's response channel; exactly one call has final=True or is fail()."""

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None: ...

    def fail(self, error: RequestError) -> None: ...


@dataclass(slots=True)
class Progress:
    """What has been produced and sent for one request, and how it is answered: streaming
    deltas, the one closing response, or one typed error (never a second final)."""

    request: EngineRequest
    sink: ResponseSink
    detok: DetokWindow
    generated: list[int] = field(default_factory=list)
    closed: bool = False
    sent: int = 0  # responses sent to the client so far
    arrival_ns: int = 0
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    kv_context: tuple[int, int, int] = (0, 0, 0)  # new, reused, total blocks on the context engine
    kv_generation: tuple[int, int, int] = (0, 0, 0)  # the same on the generation engine (latest report)
    children: dict[str, str] = field(default_factory=dict)  # child id -> engine, while it may hold work there
    leases: dict[str, str] = field(default_factory=dict)  # finished context child -> engine, until its KV is pulled
    phase: str = "routing"  # where the request is (for timeout messages)
    ending: str = ""  # why its task was cancelled on purpose: "stop" or "client"
    outcome: str = "ok"  # for metrics and the request log: ok, stopped, cancelled, timed_out, overloaded, error code
    path: str = ""  # "disaggregated" or "local"
    context_engine: str = ""
    generation_engine: str = ""
    context_sent_ns: int = 0
    context_done_ns: int = 0
    generation_sent_ns: int = 0
    last_token_ns: int = 0
    retries: int = 0
    migrations: list[str] = field(default_factory=list)  # generation engines that failed mid-stream, in order
    outbox: Channel[_Answer] | None = None  # where answers queue for the sender thread (None: sent at once)
    broken: bool = False  # a response could not be sent: nothing more goes out

    def kv_blocks(self) -> tuple[int, int, int]:
        """KV blocks the request held on both engines: new, reused (prefix hits), total."""
        c, g = self.kv_context, self.kv_generation
        return c[0] + g[0], c[1] + g[1], c[2] + g[2]

    def finished(self) -> bool:
        return self.request.stop.finished(self.generated) is not None

    def emit(self, new: tuple[int, ...] | list[int], final: bool) -> None:
        """A streaming delta: the new tokens (their detokenization window is made when sent)."""
        self.closed = final
        self.sent += 1
        self._answer(_Delta(tuple(new), final, len(self.generated)))

    def close(self) -> None:
        """The single final response when no delta carried the final flag."""
        if self.request.streaming:
            self.emit((), final=True)
            return
        self.closed = True
        self._answer(_WHOLE)

    def fail(self, error: RequestError) -> None:
        if self.closed:
            return
        if self.outcome == "ok":  # a timeout or stop named it already
            self.outcome = "overloaded" if is_overloaded(error) else error.code.value.lower()
        self.closed = True
        self._answer(error)

    def _answer(self, item: _Answer) -> None:
        if self.outbox is None:
            self.flush([item])
        else:
            self.outbox.put(item, last=not isinstance(item, _Delta) or item.final)

    def flush(self, items: list[_Answer]) -> None:
        """Send answers, in order, as few responses as possible: consecutive deltas become one
        (their tokens joined, one detokenization window over all of them). Runs on the
        outbox's thread when there is one (orchestrator/runtime/outbox.py), else at once."""
        if self.broken:
            return
        merged: list[_Answer] = []
        for item in items:
            last = merged[-1] if merged else None
            if (
                isinstance(item, _Delta) and isinstance(last, _Delta) and item.tokens
            ):  # an empty final (a stop's) stays apart
                merged[-1] = _Delta(last.tokens + item.tokens, item.final, item.count)
            else:
                merged.append(item)
        for item in merged:
            if isinstance(item, RequestError):
                try:
                    self.sink.fail(item)
                except Exception:
                    pass
                return
            try:
                self._send(item)
            except Exception as exc:
                self.broken = self.closed = True
                if self.outcome == "ok":
                    self.outcome = "internal"
                with contextlib.suppress(Exception):
                    self.sink.fail(
                        RequestError(f"a response could not be sent: {type(exc).__name__}: {exc}", ErrorCode.INTERNAL)
                    )
                return

    def _send(self, item: _Delta | _Whole) -> None:
        if isinstance(item, _Delta):
            self.sink.send(
                self.tensors(item.tokens, self.detok.window(item.tokens, final=item.final), item.count), item.final
            )
            return
        req = self.request
        if req.exclude_input_in_output:
            body = tuple(self.generated)
            window = self.detok.window(self.generated, final=True)
        else:
            body = req.input_ids + tuple(self.generated)
            window = prompt_window(req.input_ids, self.generated)
        self.sink.send(self.tensors(body, window), True)

    def tensors(self, body: tuple[int, ...], window: np.ndarray, count: int | None = None) -> dict[str, np.ndarray]:
        """The contract's outputs for `body` (EngineOutput builds them) plus the detok window."""
        perf = None
        if self.request.return_perf_metrics:
            now = time.time_ns()
            new, reused, total = self.kv_blocks()
            perf = PerfMetrics(
                arrival_time_ns=self.arrival_ns,
                first_scheduled_time_ns=self.first_scheduled_ns or self.arrival_ns,
                first_token_time_ns=self.first_token_ns or now,
                last_token_time_ns=now,
                kv_cache_alloc_new_blocks=new,
                kv_cache_reused_blocks=reused,
                kv_cache_alloc_total_blocks=total,
            )
        output = EngineOutput(
            tokens=body,
            perf=perf,
            num_input_tokens=len(self.request.input_ids),
            num_output_tokens=len(self.generated) if count is None else count,
        )
        out = output.tensors(self.request)
        out["detok_window"] = window.reshape(1, -1)
        return out
