"""How a soak sends: worker threads, each with its own gRPC streams, that send the planned
requests (and their stops) through the `ensemble` and record how each one ended.

Split from orchestrator/tools/soak.py (the command) so the client, which attributes every reply to
its request and bounds every wait, reads on its own; what it records (`Outcome`) is
judged in orchestrator/tools/soak_checks.py.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.tools.client import ensemble_inputs
from orchestrator.tools.soak_checks import Outcome, error_code
from orchestrator.tools.soak_plan import Plan

MODEL = "ensemble"


def _text(result: grpcclient.InferResult) -> str:
    arr = result.as_numpy("text_output")
    return "" if arr is None else b"".join(arr.reshape(-1)).decode("utf-8", errors="replace")


def _is_final(result: grpcclient.InferResult) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


Reply = tuple[grpcclient.InferResult | None, InferenceServerException | None]


class Stream:
    """One gRPC stream (its own client) whose replies land in a queue, carrying one request
    at a time: a stream's errors have no request id, so one-at-a-time is what lets an error
    be attributed. A reply that arrives after its request's final is seen later as a stray."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))

    def send(self, request_id: str, inputs: list[grpcclient.InferInput]) -> None:
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)

    def get(self, timeout_s: float) -> Reply | None:
        try:
            return self.replies.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def strays(self) -> list[str]:
        """Whatever is already queued (called after a final: a reply after the final)."""
        found = []
        while (reply := self.get(0.0)) is not None:
            result, error = reply
            if error is not None:
                found.append(error.message())
            elif result is not None:
                found.append(f"a response for {result.get_response().id!r}")
        return found

    def close(self, timeout_s: float, cancel: bool = False) -> bool:
        """Half-close and wait for the server to end the stream, which it does only once
        every request sent on it is complete; False if that did not happen in time."""
        done = threading.Event()

        def close() -> None:
            with contextlib.suppress(Exception):
                self.client.stop_stream(cancel_requests=cancel)
                self.client.close()
            done.set()

        threading.Thread(target=close, daemon=True, name="soak-close").start()
        return done.wait(timeout_s)


@dataclass
class _Shared:
    """What the worker threads share: the plans to take, the results, the bounds."""

    url: str
    plans: Iterator[Plan]
    send_deadline: float  # monotonic: no new request after this
    request_timeout_s: float
    stop_timeout_s: float
    abort: threading.Event  # a server process died, or too many requests hung: stop at once
    max_hung: int  # this many hung requests mean the server is broken: stop instead of waiting on each
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one request
    on_outcome: Callable[[int], None] | None = None

    def take(self) -> Plan | None:
        with self.lock:
            if time.monotonic() >= self.send_deadline or self.abort.is_set():
                return None
            return next(self.plans, None)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            done = len(self.outcomes)
            hung = outcome.kind == "hung" and sum(o.kind == "hung" for o in self.outcomes) == self.max_hung
        if hung and not self.abort.is_set():
            self.problem(f"stopped the load after {self.max_hung} hung requests: the server no longer answers")
            self.abort.set()
        if self.on_outcome is not None:
            self.on_outcome(done)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Worker:
    """Serves plans one at a time on its own request stream, and sends their stops on its
    own stop stream (a stop's reply has the stopped request's id, so it needs a stream of
    its own to be told apart from that request's final)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.requests = Stream(shared.url)
        self.stops: Stream | None = None

    def run(self) -> None:
        try:
            while (plan := self.shared.take()) is not None:
                self.shared.record(self.serve(plan))
        except Exception as exc:
            self.shared.problem(f"worker crashed: {exc!r}")
        finally:
            self.finish()

    def serve(self, plan: Plan) -> Outcome:
        start = time.monotonic()
        deadline = start + self.shared.request_timeout_s
        stop_at = None if plan.stop_delay_s is None else start + plan.stop_delay_s
        stop_sent = ""
        extra = {"stop_words": list(plan.stop_words)} if plan.stop_words else {}
        inputs = ensemble_inputs(
            plan.prompt, plan.max_tokens, stream=plan.stream, exclude_input_in_output=True, **extra
        )
        self.requests.send(plan.request_id, inputs)
        kind, code, message, texts = "", "", "", []
        while not kind:
            if stop_at is not None and not stop_sent and time.monotonic() >= stop_at:
                self._send_stop(plan.request_id)
                stop_sent = "before_final"
            wake = deadline if stop_at is None or stop_sent else min(deadline, stop_at)
            reply = self.requests.get(min(wake - time.monotonic(), 0.5))
            if reply is None:
                if time.monotonic() >= deadline:
                    kind, message = "hung", f"no final response within {self.shared.request_timeout_s:g}s"
                elif self.shared.abort.is_set():
                    kind, message = "hung", "no final response before the soak stopped"
                continue
            result, error = reply
            if error is not None or result is None:
                kind, message = "error", error.message() if error is not None else "an empty reply"
                code = error_code(message)
                continue
            rid = result.get_response().id
            if rid != plan.request_id:
                self.shared.problem(f"a response for {rid!r} arrived after its final (during {plan.request_id})")
                continue
            texts.append(_text(result))
            if _is_final(result):
                kind = "ok"
        latency = time.monotonic() - start
        problems: list[str] = []
        if stop_at is not None and not stop_sent:
            self._send_stop(plan.request_id)  # its delay outlived the request: a stop after the final
            stop_sent = "after_final"
        if stop_sent:
            problems.extend(self._await_stop(plan.request_id))
        if kind == "hung":
            self._replace_requests()
        else:
            problems.extend(f"after its final: {s}" for s in self.requests.strays())
        return Outcome(plan, kind, code, message, "".join(texts), latency, stop_sent, tuple(problems))

    def _send_stop(self, request_id: str) -> None:
        if self.stops is None:
            self.stops = Stream(self.shared.url)
        self.stops.send(request_id, ensemble_inputs("", 1, stop=True))

    def _await_stop(self, request_id: str) -> list[str]:
        """A stop request must get exactly one response: an empty final with its id."""
        assert self.stops is not None
        timeout_s = 1.0 if self.shared.abort.is_set() else self.shared.stop_timeout_s
        reply = self.stops.get(timeout_s)
        if reply is None:
            self.stops.close(5.0, cancel=True)
            self.stops = None
            return [f"its stop request got no response within {timeout_s:g}s"]
        result, error = reply
        problems = []
        if error is not None or result is None:
            problems.append(f"its stop request failed: {error.message() if error else 'an empty reply'}")
        elif not _is_final(result) or _text(result) or result.get_response().id != request_id:
            problems.append(
                f"its stop request's response is not one empty final with its id "
                f"(final={_is_final(result)}, text={_text(result)!r}, id={result.get_response().id!r})"
            )
        problems.extend(f"after its stop's final: {s}" for s in self.stops.strays())
        return problems

    def _replace_requests(self) -> None:
        """After a hang the stream still owes a reply that could not be attributed: cancel it
        (ending the hung request in Triton) and carry on with a fresh stream."""
        self.requests.close(10.0, cancel=True)
        self.requests = Stream(self.shared.url)

    def finish(self) -> None:
        for stream in (self.requests, self.stops):
            if stream is None:
                continue
            if self.shared.abort.is_set():  # the server cannot finish what it holds: do not wait
                stream.close(5.0, cancel=True)
                continue
            if not stream.close(30.0):
                self.shared.problem("a stream did not end after its last final: the server still holds a request on it")
            for stray in stream.strays():
                self.shared.problem(f"after a stream's last final: {stray}")


def run_load(
    url: str,
    plans: Sequence[Plan],
    concurrency: int,
    send_deadline: float,
    request_timeout_s: float,
    stop_timeout_s: float = 10.0,
    on_outcome: Callable[[int], None] | None = None,
    abort: threading.Event | None = None,
    max_hung: int = 10,
) -> tuple[list[Outcome], list[str]]:
    """Run `plans` on `concurrency` workers until they run out, the send deadline passes,
    `max_hung` requests hung or `abort` is set (then requests still waiting end as hung)."""
    shared = _Shared(
        url, iter(plans), send_deadline, request_timeout_s, stop_timeout_s, abort or threading.Event(), max_hung,
        on_outcome=on_outcome,
    )  # fmt: skip
    threads = [
        threading.Thread(target=Worker(shared).run, name=f"soak-worker-{i}", daemon=True)
        for i in range(min(concurrency, len(plans)))
    ]
    for t in threads:
        t.start()
    # Every wait of a worker is bounded (request and stop timeouts, stream close), so is this.
    per_request = request_timeout_s + stop_timeout_s + 15.0
    join_by = max(time.monotonic(), send_deadline) + per_request + 60.0
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    problems = list(shared.problems)
    if any(t.is_alive() for t in threads):
        problems.append("a worker thread did not finish: a client wait was not bounded")
    return list(shared.outcomes), problems
