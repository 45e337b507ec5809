"""A stub engine's per-sequence model work on its own (orchestrator/stub_engine/model_work.py):
prefill, the batched decode, a token accepted or a context phase finished, each failure
ending its own sequence only; and a generation request's KV pull that fails or is stopped
(orchestrator/stub_engine/pulls.py; successful pulls: test_engine_kv.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.endings import Endings
from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.kv_store import KVStore
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.model_work import SequenceWork
from orchestrator.stub_engine.pulls import KvPulls
from orchestrator.stub_engine.queues import SequenceQueues
from orchestrator.stub_engine.sequence import EngineSequence, max_slots
from orchestrator.stub_engine.tiny_model import InductionModel, SequenceKV
from orchestrator.telemetry.recorder import ENGINE_SPECS, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.contract import EngineOutput, EngineRequest, RequestType
from orchestrator.wire.errors import ErrorCode, RequestError
from tests.engine_harness import PROMPT, request

NOW = 42


@dataclass
class Sink:
    sent: list[tuple[EngineOutput, bool]] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)

    def send(self, output: EngineOutput, final: bool) -> None:
        self.sent.append((output, final))

    def fail(self, error: RequestError) -> None:
        self.errors.append(error)

    def cancelled(self) -> bool:
        return False


@dataclass
class Exchange:
    """Stands in for KvExchange: issues a marker blob, pulls fail with `pull_error` (or wait)."""

    issued: list[tuple[str, int, int]] = field(default_factory=list)
    pull_error: Exception | None = None

    def issue(self, req: EngineRequest, first: int, lease: int, now_ns: int) -> bytes:
        self.issued.append((req.request_id, first, lease))
        return b"blob"

    async def pull(self, handoff: Any, first: int, count: int) -> Any:
        if self.pull_error is not None:
            raise self.pull_error
        await asyncio.Event().wait()


class Parts:
    """One engine's pieces, as EngineCore composes them (no loop, no transfer server)."""

    def __init__(self, **config: Any) -> None:
        self.cfg = cfg = EngineConfig.free(**{"tokens_per_block": 4, **config})
        self.model = InductionModel(cfg.geometry)
        self.store = KVStore(cfg.geometry, cfg.layout, cfg.num_kv_blocks)
        self.kv = KVCacheManager(BlockPool(cfg.num_kv_blocks), cfg.tokens_per_block, cfg.enable_kv_cache_reuse)
        self.leases = LeaseTable(self.kv, 60.0)
        self.exchange = Exchange()
        self.queues = SequenceQueues()
        self.wakes = 0
        self.endings = Endings(self.queues, self.kv, self.leases, self._wake, lambda: NOW, 0.1)
        x: Any = self.exchange
        self.work = SequenceWork("eng", cfg, self.model, self.store, self.kv, self.leases, x, self.endings)
        telemetry = Telemetry(MemoryRegistry(ENGINE_SPECS), deferred=False)
        self.pulls = KvPulls(
            "eng",
            cfg,
            self.model,
            self.store,
            self.kv,
            x,
            telemetry,
            self.queues,
            self.endings,
            self._wake,
            EngineClock(now_ns=lambda: NOW),
        )

    def _wake(self) -> None:
        self.wakes += 1

    def admitted(self, req: EngineRequest, fault: str = "none") -> EngineSequence:
        """A sequence as admission leaves it: blocks held, its model view of them."""
        hashes = block_hashes(req.input_ids, self.cfg.tokens_per_block)
        seq = EngineSequence(req, Sink(), 1, hashes, tokens=list(req.input_ids), fault=fault)
        alloc = self.kv.admit(req.input_ids, max_slots(req), hashes)
        assert alloc is not None
        seq.alloc, seq.kv = alloc, SequenceKV(key=req.sampling.key(), table=alloc.blocks)
        return seq

    def release(self, *seqs: EngineSequence) -> None:
        for seq in seqs:
            self.endings.finish(seq)
        self.leases.close()
        self.kv.check_idle()


def sink(seq: EngineSequence) -> Sink:
    assert isinstance(seq.sink, Sink)
    return seq.sink


def test_prefill_computes_only_the_uncached_prompt_and_reuse_does_not_change_the_token() -> None:
    p = Parts()
    first = p.admitted(request(PROMPT, rid="a"))
    assert p.work.prefill(first) == len(PROMPT)
    second = p.admitted(request(PROMPT, rid="b"))  # the first committed its full blocks
    cached = second.alloc.cached_tokens  # type: ignore[union-attr]
    assert cached > 0
    assert p.work.prefill(second) == len(PROMPT) - cached
    assert first.pending is not None and second.pending == first.pending
    p.release(first, second)


def test_decode_is_one_batch_and_a_sequence_that_cannot_grow_fails_alone() -> None:
    p = Parts()
    a, b = p.admitted(request(PROMPT, rid="a")), p.admitted(request(PROMPT, rid="b", max_tokens=4))
    for seq in (a, b):
        p.work.prefill(seq)
        p.work.accept(seq, NOW)
    attended = p.work.decode([a, b])
    assert attended == a.kv.length + b.kv.length > 0  # type: ignore[union-attr]
    assert a.pending is not None and b.pending == a.pending  # same prompt, same sampling
    p.kv.release(b.alloc)  # type: ignore[arg-type]
    b.alloc = None  # a sequence without blocks (a bug's state): growing it fails
    p.work.decode([a, b])
    assert [e.code for e in sink(b).errors] == [ErrorCode.INTERNAL] and b.done
    assert sink(a).errors == [] and not a.done
    p.release(a, b)


def test_a_failed_model_call_fails_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Parts()
    seqs = [p.admitted(request(PROMPT, rid=r)) for r in "ab"]
    for seq in seqs:
        p.work.prefill(seq)
        p.work.accept(seq, NOW)

    def broken(*args: Any) -> list[int]:
        raise RuntimeError("numpy ran out of memory")

    monkeypatch.setattr(p.model, "decode_step", broken)
    assert p.work.decode(seqs) == 0
    for seq in seqs:
        (error,) = sink(seq).errors
        assert error.code is ErrorCode.INTERNAL and "RuntimeError" in error.message
    p.release(*seqs)


def test_guarded_passes_results_through_and_turns_a_failure_into_the_sequences_typed_error() -> None:
    p = Parts()
    seq = p.admitted(request(PROMPT))
    assert p.work.guarded(seq, lambda x: x + 1, 1) == 2 and not seq.done

    def lost() -> None:
        raise RequestError("lease 7 is gone", ErrorCode.NOT_FOUND)

    assert p.work.guarded(seq, lost) is None
    assert [e.code for e in sink(seq).errors] == [ErrorCode.NOT_FOUND] and seq.done
    p.release()


def test_accept_streams_each_token_and_ends_on_the_end_token() -> None:
    p = Parts()
    seq = p.admitted(request(PROMPT, streaming=True, end_id=99))
    for token in (5, 6):
        seq.pending = token
        p.work.accept(seq, NOW)
    seq.pending = 99
    p.work.accept(seq, NOW)
    assert [(o.tokens, f) for o, f in sink(seq).sent] == [((5,), False), ((6,), False), ((), True)]
    assert seq.done and seq.alloc is None  # blocks back at once
    p.release()


def test_an_injected_crash_ends_the_stream_after_fault_after_tokens() -> None:
    p = Parts(fault_after_tokens=2)
    seq = p.admitted(request(PROMPT, streaming=True), fault="crash")
    for token in (5, 6, 7):
        seq.pending = token
        p.work.accept(seq, NOW)
    assert [o.tokens for o, _ in sink(seq).sent] == [(5,), (6,)]
    assert [e.message for e in sink(seq).errors] == ["engine 'eng' crashed mid-stream (injected fault)"]
    p.release()


def context(p: Parts, fault: str = "none", **kw: Any) -> EngineSequence:
    seq = p.admitted(request(PROMPT, rid="c", request_type=RequestType.CONTEXT_ONLY, **kw), fault=fault)
    seq.pending = 5
    return seq


def test_a_context_phase_ends_with_its_first_token_and_a_lease_on_its_blocks() -> None:
    async def body() -> None:
        p = Parts()
        seq = context(p)
        blocks = list(seq.alloc.blocks)  # type: ignore[union-attr]
        p.work.accept_first(seq, NOW)
        ((out, final),) = sink(seq).sent
        assert final and out.tokens == (5,) and out.context_phase_params == b"blob"
        assert seq.done and seq.alloc is None and len(p.leases) == 1  # the lease holds the blocks now
        assert p.exchange.issued[0][:2] == ("c", 5)
        assert all(p.kv.pool.ref_count[b] for b in blocks)
        p.release()

    asyncio.run(body())


@pytest.mark.parametrize("end_id, max_tokens", [(5, 16), (None, 1)])
def test_a_context_phase_that_is_already_finished_leaves_no_lease(end_id: int | None, max_tokens: int) -> None:
    p = Parts()
    seq = context(p, end_id=end_id, max_tokens=max_tokens)
    p.work.accept_first(seq, NOW)
    ((out, final),) = sink(seq).sent
    assert final and out.context_phase_params is None and out.tokens == (() if end_id else (5,))
    assert len(p.leases) == 0 and p.exchange.issued == []
    p.release()


def test_context_faults_crash_before_answering_or_drop_the_lease() -> None:
    async def body() -> None:
        p = Parts()
        crashed = context(p, fault="crash")
        p.work.accept_first(crashed, NOW)
        assert [e.message for e in sink(crashed).errors] == [
            "engine 'eng' crashed before the context response (injected fault)"
        ]
        assert sink(crashed).sent == [] and crashed.done
        dropped = context(p, fault="drop_lease")
        p.work.accept_first(dropped, NOW)
        assert sink(dropped).sent[0][0].context_phase_params == b"blob"  # answered as if all were well
        assert len(p.leases) == 0 and p.leases.dropped == 1
        p.release()

    asyncio.run(body())


# -- pulls -----------------------------------------------------------------------------------


def handoff_for(seq: EngineSequence) -> Handoff:
    return Handoff(
        request_id="c", source_engine="ctx", first_token=5, num_tokens=len(PROMPT), prompt_digest=0, lease_id=1,
        geometry=EngineConfig.free(tokens_per_block=4).geometry, layout=EngineConfig.free().layout,
        host="127.0.0.1", port=1, host_id="h",
    )  # fmt: skip


def test_a_failed_pull_fails_its_sequence_with_the_pulls_error_and_frees_its_blocks() -> None:
    async def body() -> None:
        p = Parts()
        p.exchange.pull_error = RequestError("lease 1 on 'ctx' is gone", ErrorCode.NOT_FOUND)
        seq = p.admitted(request(PROMPT, request_type=RequestType.GENERATION_ONLY))
        seq.handoff = handoff_for(seq)
        p.pulls.begin(seq)
        assert p.queues.pulling == {seq}
        await asyncio.wait_for(asyncio.shield(seq.pull), 5)  # type: ignore[arg-type]
        assert [e.code for e in sink(seq).errors] == [ErrorCode.NOT_FOUND]
        assert not p.queues.pulling and not p.queues.ready and seq.alloc is None
        p.release()

    asyncio.run(body())


def test_a_sequence_stopped_mid_pull_never_becomes_ready() -> None:
    async def body() -> None:
        p = Parts()
        seq = p.admitted(request(PROMPT, request_type=RequestType.GENERATION_ONLY))
        seq.handoff = handoff_for(seq)
        p.pulls.begin(seq)
        await asyncio.sleep(0.01)  # the pull waits on its transfer
        p.endings.finish(seq)
        await asyncio.sleep(0.01)
        assert seq.pull is not None and seq.pull.cancelled()
        assert not p.queues.pulling and not p.queues.ready
        p.release()

    asyncio.run(body())
