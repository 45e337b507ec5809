"""The orchestrator's in-flight table on its own (orchestrator/serving/in_flight.py): ids in
flight, the max_in_flight refusal, stop / sibling stop / client cancellation / deadline, and
the net under a task that ends without answering. No engines: each request's task is a
plain coroutine standing in for the pipeline's `_serve`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.deadline import StallTimer
from orchestrator.serving.in_flight import InFlight, ended_early
from orchestrator.serving.progress import Progress
from orchestrator.telemetry.recorder import SPECS, RequestRecord, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.text.detokenize import DetokWindow
from orchestrator.wire.contract import EngineRequest, RequestType, SamplingParams
from orchestrator.wire.errors import DuplicateRequest, ErrorCode, InvalidInput, Overloaded, RequestError
from orchestrator.wire.stop_condition import StopCondition


@dataclass
class Sink:
    """A ResponseSink that records its calls; `cancel` (a bool or a callable) is Triton's is_cancelled."""

    sent: list[tuple[dict[str, np.ndarray], bool]] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    cancel: bool | Callable[[], bool] = False
    polls: int = 0

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        self.sent.append((tensors, final))

    def fail(self, error: RequestError) -> None:
        self.errors.append(error)

    def cancelled(self) -> bool:
        self.polls += 1
        return self.cancel() if callable(self.cancel) else self.cancel

    @property
    def finals(self) -> int:
        return sum(final for _, final in self.sent) + len(self.errors)


def request(rid: str, streaming: bool = True) -> EngineRequest:
    return EngineRequest(
        request_id=rid, input_ids=(5, 6, 7), stop=StopCondition(max_new_tokens=4), sampling=SamplingParams(),
        request_type=RequestType.AGGREGATE, streaming=streaming,
    )  # fmt: skip


@dataclass
class Table:
    """An InFlight with recording callbacks: what was released and recorded, by key."""

    config: OrchestratorConfig
    telemetry: Telemetry = field(default_factory=lambda: Telemetry(MemoryRegistry(SPECS), deferred=False))
    released: list[Progress] = field(default_factory=list)
    recorded: list[tuple[str, str]] = field(default_factory=list)  # (key, outcome)
    table: Any = None

    def __post_init__(self) -> None:
        self.table = InFlight(self.config, self.telemetry, self._record, self.released.append)

    def _record(self, p: Progress, key: str) -> RequestRecord:
        self.recorded.append((key, p.outcome))
        return RequestRecord(key, p.request.streaming, p.outcome, "", "", "", *[0] * 10)

    @property
    def registry(self) -> MemoryRegistry:
        reg = self.telemetry.registry
        assert isinstance(reg, MemoryRegistry)
        return reg

    def start(self, rid: str, serve: Callable[[Progress], Any] | None = None, sink: Sink | None = None) -> Progress:
        """Admit `rid` and run `serve(progress)` as its task (default: wait forever, as a long request)."""
        sink = sink or Sink()
        self.table.check(request(rid), sink, rid)
        p = Progress(request=request(rid), sink=sink, detok=DetokWindow((5, 6, 7)))

        async def forever(p: Progress) -> None:
            await asyncio.Event().wait()

        task = asyncio.get_running_loop().create_task((serve or forever)(p))
        self.table.add(rid, task, p)
        return p


def make(**config: Any) -> Table:
    return Table(OrchestratorConfig(("c",), ("g",), **config))


def test_a_duplicate_id_and_one_over_max_in_flight_are_refused_and_nothing_is_kept() -> None:
    async def body() -> None:
        t = make(max_in_flight=2, cancel_check_ms=0)
        t.start("a")
        with pytest.raises(DuplicateRequest, match="request id 'a' is already in flight"):
            t.table.check(request("a"), Sink(), "a")
        t.start("b")
        with pytest.raises(Overloaded) as refused:
            t.table.check(request("c"), Sink(), "c")
        assert refused.value.code is ErrorCode.UNAVAILABLE
        assert "already serves 2 requests (max_in_flight=2)" in refused.value.message
        assert set(t.table.entries) == {"a", "b"}
        assert t.recorded == [("c", "overloaded")]  # counted and logged, as a request that ended here
        assert t.registry.value("disagg_orchestrator_rejected_total", reason="overloaded") == 1
        await t.table.close()
        assert t.table.entries == {}

    asyncio.run(body())


def test_max_in_flight_0_is_unlimited() -> None:
    async def body() -> None:
        t = make(max_in_flight=0, cancel_check_ms=0)
        for i in range(50):
            t.start(f"r{i}")
        assert len(t.table.entries) == 50
        await t.table.close()

    asyncio.run(body())


def test_end_stops_the_task_whose_answer_is_one_empty_final_and_the_entry_goes() -> None:
    async def body() -> None:
        t = make(cancel_check_ms=0)
        sink = Sink()
        p = t.start("a", sink=sink)
        await asyncio.sleep(0)  # the task runs up to its wait
        assert t.table.end("nobody") is False
        assert t.table.end("a") is True
        assert p.ending == "stop"
        await asyncio.sleep(0.01)  # the task ends, its done callback runs
        assert t.table.entries == {}
        assert p.outcome == "stopped" and sink.finals == 1 and sink.sent[-1][1] is True
        assert t.released == [p] and t.recorded == [("a", "stopped")]  # released and recorded once
        assert t.table.end("a") is False  # gone

    asyncio.run(body())


def test_a_task_cancelled_before_its_first_step_is_still_answered() -> None:
    """A stop right behind its request: the task never ran, so the table answers for it."""

    async def body() -> None:
        t = make(cancel_check_ms=0)
        sink = Sink()
        p = t.start("a", sink=sink)
        assert t.table.end("a") is True  # before the loop ever ran the task
        await asyncio.sleep(0.01)
        assert sink.finals == 1 and p.closed and p.outcome == "stopped"
        assert t.table.entries == {}

    asyncio.run(body())


def test_a_task_that_ends_without_answering_fails_internal_never_hangs() -> None:
    async def body() -> None:
        t = make(cancel_check_ms=0)
        sink = Sink()

        async def silent(p: Progress) -> None:
            return None

        t.start("a", silent, sink)
        await asyncio.sleep(0.01)
        assert [e.code for e in sink.errors] == [ErrorCode.INTERNAL]
        assert "ended without a response" in sink.errors[0].message
        assert t.table.entries == {} and len(t.released) == 1 and t.recorded == [("a", "internal")]

    asyncio.run(body())


def test_an_answered_task_is_only_forgotten() -> None:
    async def body() -> None:
        t = make(cancel_check_ms=0)
        sink = Sink()

        async def answers(p: Progress) -> None:
            p.close()

        t.start("a", answers, sink)
        await asyncio.sleep(0.01)
        assert sink.finals == 1 and t.table.entries == {}
        assert t.released == [] and t.recorded == []  # the pipeline's _serve settles an answered request

    asyncio.run(body())


def test_client_cancellation_is_polled_in_turn_and_ends_the_request_cancelled() -> None:
    """One request polled per tick (cancel_checks_per_tick=1), in turn; a sink that cannot
    answer counts as gone."""

    async def body() -> None:
        t = make(cancel_check_ms=1, cancel_checks_per_tick=1)
        quiet, gone = Sink(), Sink()

        def broken() -> bool:
            raise RuntimeError("the stub is gone")

        broken_sink = Sink(cancel=broken)
        t.start("quiet", sink=quiet)
        t.start("gone", sink=gone)
        t.start("broken", sink=broken_sink)
        gone.cancel = True
        for _ in range(500):
            if len(t.table.entries) == 1:
                break
            await asyncio.sleep(0.002)
        assert set(t.table.entries) == {"quiet"}
        assert [e.code for e in gone.errors] == [ErrorCode.CANCELLED]
        assert [e.code for e in broken_sink.errors] == [ErrorCode.CANCELLED]
        assert t.table.cancelled_by_client == 2
        assert quiet.polls >= 1 and quiet.finals == 0
        await t.table.close()
        assert [e.code for e in quiet.errors] == [ErrorCode.CANCELLED]  # shutdown
        assert t.recorded[-1] == ("quiet", "cancelled")

    asyncio.run(body())


def test_a_stopped_request_is_not_also_counted_as_cancelled_by_its_client() -> None:
    async def body() -> None:
        t = make(cancel_check_ms=1)
        sink = Sink(cancel=True)
        p = t.start("a", sink=sink)
        t.table.end("a")
        await asyncio.sleep(0.01)
        assert t.table.cancelled_by_client == 0 and p.outcome == "stopped" and sink.errors == []

    asyncio.run(body())


def test_stop_answers_the_stop_request_and_forwards_an_id_not_held_here() -> None:
    async def body() -> None:
        t = make(cancel_check_ms=0)
        t.start("held")
        forwarded: list[str] = []
        ack = Sink()
        assert t.table.stop(request("held"), ack, forwarded.append) is True
        assert forwarded == [] and [final for _, final in ack.sent] == [True]
        other = Sink()
        assert t.table.stop(request("elsewhere"), other, forwarded.append) is False
        assert forwarded == ["elsewhere"] and [final for _, final in other.sent] == [True]
        assert t.table.stop(request("nowhere"), Sink(), None) is False  # one instance: nothing to tell
        with pytest.raises(InvalidInput, match="stop=true needs the id"):
            t.table.stop(request(""), Sink(), forwarded.append)
        stops = t.registry
        assert stops.value("disagg_orchestrator_stops_total", where="here", found="true") == 1
        assert stops.value("disagg_orchestrator_stops_total", where="here", found="false") == 2
        assert stops.value("disagg_orchestrator_stops_total", where="forwarded", found="false") == 1
        assert t.table.end_for_sibling("nowhere") is False
        assert stops.value("disagg_orchestrator_stops_total", where="from_sibling", found="false") == 1
        await asyncio.sleep(0)

    asyncio.run(body())


@pytest.mark.parametrize(
    "ending, fired, outcome, code, ours",
    [
        ("stop", False, "stopped", None, True),
        ("", True, "timed_out", ErrorCode.UNAVAILABLE, True),
        ("client", False, "cancelled", ErrorCode.CANCELLED, True),
        ("", False, "cancelled", ErrorCode.CANCELLED, False),  # shutdown: not ours
    ],
)
def test_ended_early_says_why_in_the_one_final_answer(
    ending: str, fired: bool, outcome: str, code: ErrorCode | None, ours: bool
) -> None:
    sink = Sink()
    p = Progress(request=request("a"), sink=sink, detok=DetokWindow((5, 6, 7)), ending=ending)
    deadline = StallTimer(2.5)
    deadline.fired = fired
    assert ended_early(p, deadline) is ours
    assert p.closed and sink.finals == 1
    assert [e.code for e in sink.errors] == ([code] if code else [])
    if fired:
        assert "request_timeout_s=2.5" in sink.errors[0].message and "routing phase" in sink.errors[0].message
    assert p.outcome == outcome
