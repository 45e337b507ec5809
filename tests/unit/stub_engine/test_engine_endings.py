"""How requests end inside a stub engine, on their own: the sequence queues
(orchestrator/stub_engine/queues.py) and the endings (orchestrator/stub_engine/endings.py):
blocks back on every path, exactly one final answer, stop by id, cancellation polling."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.stub_engine import endings as endings_module
from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.endings import Endings
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.queues import SequenceQueues
from orchestrator.stub_engine.sequence import EngineSequence
from orchestrator.wire.contract import EngineOutput
from orchestrator.wire.errors import ErrorCode, InvalidInput, RequestError
from tests.engine_harness import PROMPT, request

TPB = 4


@dataclass
class Sink:
    sent: list[tuple[EngineOutput, bool]] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    cancel: Any = False  # a bool, or an exception Triton's is_cancelled raises

    def send(self, output: EngineOutput, final: bool) -> None:
        self.sent.append((output, final))

    def fail(self, error: RequestError) -> None:
        self.errors.append(error)
        if self.cancel == "fail raises":
            raise RuntimeError("the response sender is gone")

    def cancelled(self) -> bool:
        if isinstance(self.cancel, Exception):
            raise self.cancel
        return self.cancel is True

    @property
    def finals(self) -> int:
        return sum(final for _, final in self.sent) + len(self.errors)


@dataclass
class Parts:
    kv: KVCacheManager = field(default_factory=lambda: KVCacheManager(BlockPool(256), TPB))
    queues: SequenceQueues = field(default_factory=SequenceQueues)
    wakes: int = 0
    leases: Any = None
    endings: Any = None

    def __post_init__(self) -> None:
        self.leases = LeaseTable(self.kv, 60.0)
        self.endings = Endings(self.queues, self.kv, self.leases, self._wake, lambda: 7, cancel_check_s=0.1)

    def _wake(self) -> None:
        self.wakes += 1

    def seq(self, rid: str = "r", hold: bool = True, **kw: Any) -> EngineSequence:
        """A sequence holding blocks for its prompt (as admission leaves it)."""
        req = request(PROMPT, rid=rid, **kw)
        s = EngineSequence(request=req, sink=Sink(), arrival_ns=1, hashes=[], tokens=list(PROMPT))
        if hold:
            s.alloc = self.kv.admit(req.input_ids, len(PROMPT) + req.stop.max_new_tokens)
        return s


def sink(seq: EngineSequence) -> Sink:
    assert isinstance(seq.sink, Sink)
    return seq.sink


# -- queues ----------------------------------------------------------------------------------


def test_queues_list_every_sequence_count_them_and_forget_the_ended() -> None:
    p = Parts()
    q = p.queues
    w, pulling, ready, running, stalled = (p.seq(n, hold=False) for n in "wprus")
    q.waiting.append(w)
    q.pulling.add(pulling)
    q.ready.append(ready)
    q.running.append(running)
    q.stalled.append(stalled)
    assert q.all() == [w, pulling, ready, running, stalled] and q.active == 5
    for s in (w, pulling, ready, running, stalled):
        s.done = True
    q.prune()
    assert list(q.waiting) == [] and list(q.ready) == [] and q.running == [] and q.stalled == []
    assert q.pulling == {pulling}  # a pull leaves `pulling` itself when it ends
    q.waiting.append(w)
    q.clear()
    assert q.active == 1 and q.all() == [pulling]


# -- finish, fail, deliver --------------------------------------------------------------------


def test_finish_gives_the_blocks_back_once_and_wakes_the_loop() -> None:
    p = Parts()
    s = p.seq()
    assert p.kv.pool.num_free < p.kv.pool.num_blocks and p.kv.reserved
    p.queues.pulling.add(s)
    p.endings.finish(s)
    assert s.done and s.alloc is None and not p.queues.pulling and p.wakes == 1
    p.endings.finish(s)  # idempotent
    p.kv.check_idle()
    assert sink(s).finals == 0  # finishing sends nothing: the caller delivers


def test_fail_sends_one_error_never_after_a_final_and_survives_a_broken_sink() -> None:
    p = Parts()
    s = p.seq()
    p.endings.fail(s, RequestError("first", ErrorCode.UNAVAILABLE))
    p.endings.fail(s, RequestError("second", ErrorCode.INTERNAL))
    assert [e.message for e in sink(s).errors] == ["first"] and s.closed
    answered = p.seq("b")
    p.endings.deliver(answered, EngineOutput(tokens=(1,)), final=True)
    p.endings.fail(answered, RequestError("late", ErrorCode.UNAVAILABLE))
    assert sink(answered).errors == [] and sink(answered).finals == 1 and answered.done
    broken = p.seq("c")
    sink(broken).cancel = "fail raises"
    p.endings.fail(broken, RequestError("x", ErrorCode.UNAVAILABLE))  # does not raise
    assert broken.closed and broken.done
    p.kv.check_idle()


def test_deliver_marks_the_sequence_closed_only_on_the_final_output() -> None:
    p = Parts()
    s = p.seq()
    p.endings.deliver(s, EngineOutput(tokens=(1,)), final=False)
    assert not s.closed
    p.endings.deliver(s, EngineOutput(tokens=(2,)), final=True)
    assert s.closed and [final for _, final in sink(s).sent] == [False, True]
    p.endings.finish(s)


def test_finish_cancels_a_pull_in_progress() -> None:
    async def body() -> None:
        p = Parts()
        s = p.seq()
        s.pull = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        await asyncio.sleep(0)
        p.endings.finish(s)
        await asyncio.sleep(0)
        assert s.pull.cancelled()

    asyncio.run(body())


# -- stop ------------------------------------------------------------------------------------


def test_stop_ends_every_sequence_with_the_id_and_its_leases() -> None:
    async def body() -> None:
        p = Parts()
        streaming = p.seq("x", streaming=True)
        whole = p.seq("x", streaming=False)
        whole.generated = [9, 9]
        other = p.seq("y")
        p.queues.running.extend([streaming, other])
        p.queues.waiting.append(whole)
        lease_alloc = p.kv.admit(PROMPT, len(PROMPT))
        assert lease_alloc is not None
        p.leases.create(lease_alloc, len(PROMPT), owner="x")
        assert p.endings.stop("x") == 3  # two sequences and one lease
        assert [(o.tokens, f) for o, f in sink(streaming).sent] == [((), True)]  # streaming: an empty final
        assert [(o.tokens, f) for o, f in sink(whole).sent] == [((9, 9), True)]  # the tokens so far
        assert p.queues.all() == [other] and len(p.leases) == 0
        assert p.endings.stop("x") == 0  # already ended: harmless
        with pytest.raises(InvalidInput, match="needs the request id"):
            p.endings.stop("")
        p.endings.finish(other)
        p.kv.check_idle()

    asyncio.run(body())


# -- cancellation polling ----------------------------------------------------------------------


def test_cancellations_are_polled_at_most_every_interval_and_a_sink_that_cannot_say_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(endings_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    p = Parts()
    stays, gone, broken = p.seq("a"), p.seq("b"), p.seq("c")
    p.queues.running.extend([stays, gone])
    p.queues.stalled.append(broken)
    p.endings.drop_cancelled()  # polls: nobody cancelled yet
    sink(gone).cancel = True
    sink(broken).cancel = RuntimeError("is_cancelled failed")
    clock[0] += 0.05
    p.endings.drop_cancelled()  # within cancel_check_s: not polled
    assert p.queues.active == 3
    clock[0] += 0.06  # 0.11 s since the last poll
    p.endings.drop_cancelled()
    assert p.queues.all() == [stays]
    for s in (gone, broken):
        assert [e.code for e in sink(s).errors] == [ErrorCode.CANCELLED]
        assert sink(s).errors[0].message == "request cancelled by the client"
    assert sink(stays).finals == 0
    p.endings.finish(stays)
    p.kv.check_idle()
