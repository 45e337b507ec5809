"""One step's model work for each sequence: prefill, the batched decode, accepting tokens.

Why apart from the scheduler (`core.py`): the loop decides which sequences a step takes;
what the tiny model then computes for each, and how a computed token becomes an output
(a streamed delta, the final answer, or a context phase's handoff), is this module's.
A failure here ends that sequence only, with a typed error (`guarded`).
"""

from __future__ import annotations

from typing import Callable

from orchestrator.stub_engine.backing import BlockStore, ModelRules
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.endings import Endings
from orchestrator.stub_engine.faults import context_crash, stream_crash
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.kv_exchange import KvExchange
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.sequence import EngineSequence, output_for, take_token
from orchestrator.wire.contract import RequestType
from orchestrator.wire.errors import as_request_error


class SequenceWork:
    """The model's work on one engine's sequences; ends them through `endings`."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        model: ModelRules,
        store: BlockStore,
        kv: KVCacheManager,
        leases: LeaseTable,
        exchange: KvExchange,
        endings: Endings,
    ) -> None:
        self.name = name
        self.config = config
        self.model = model
        self.store = store
        self.kv = kv
        self.leases = leases
        self.exchange = exchange
        self.endings = endings

    def guarded(self, seq: EngineSequence, fn: Callable[..., int | None], *args: object) -> int | None:
        """Run one sequence's work; a failure ends that sequence only, with a typed error."""
        try:
            return fn(*args)
        except Exception as exc:
            self.endings.fail(seq, as_request_error(exc))
            return None

    def prefill(self, seq: EngineSequence, tokens: int | None = None) -> int:
        """Write the K/V of the prompt's next `tokens` uncached tokens (all of them when None:
        a chunk of a chunked prefill otherwise), and once the prompt is complete compute the
        first token; returns tokens computed (at least 1).

        Only blocks now written join the prefix cache, so no other prompt can reuse a block
        of this one that a later chunk has yet to fill."""
        alloc, kv = seq.alloc, seq.kv
        assert alloc is not None and kv is not None
        ids = seq.request.input_ids
        if kv.length < alloc.cached_tokens:  # the first chunk: the cached prefix joins the sequence's view
            kv.length = alloc.cached_tokens
            self.model.reindex(self.store, kv)
        start = kv.length
        end = len(ids) if tokens is None else min(len(ids), start + tokens)
        if start < end:
            self.model.write(self.store, kv, ids[start:end], ids[start - 1] if start else None)
        self.kv.commit(alloc, ids if end == len(ids) else ids[:end], seq.hashes)
        if end == len(ids):
            seq.pending = self.model.next_token(self.store, kv)
        return max(1, end - start)

    def decode(self, seqs: list[EngineSequence]) -> int:
        """Write each sequence's last accepted token and compute its next, as one batched model
        call (per-sequence numpy calls cost ~120 us each, more than a modelled decode step can
        hide at batch 64); returns the KV tokens attended."""
        batch: list[EngineSequence] = []
        slots_per_block = self.kv.tokens_per_block
        for seq in seqs:  # a new block only every tokens_per_block steps: check before calling
            alloc, kv = seq.alloc, seq.kv
            has_room = alloc is not None and kv is not None and kv.length < len(alloc.blocks) * slots_per_block
            if has_room or self.guarded(seq, self.grow, seq):
                batch.append(seq)
        if not batch:
            return 0
        try:
            nexts = self.model.decode_step(
                self.store,
                [s.kv for s in batch],  # type: ignore[misc]
                [s.tokens[-1] for s in batch],
                [s.tokens[-2] if len(s.tokens) > 1 else -1 for s in batch],
            )
        except Exception as exc:
            for seq in batch:
                self.endings.fail(seq, as_request_error(exc))
            return 0
        attended = 0
        for seq, token in zip(batch, nexts):
            seq.pending = token
            alloc = seq.alloc
            if len(seq.tokens) >= (len(alloc.hashes) + 1) * slots_per_block:  # type: ignore[union-attr]
                self.guarded(seq, self.kv.commit, alloc, seq.tokens, seq.hashes)  # a block just filled up
            attended += seq.kv.length  # type: ignore[union-attr]
        return attended

    def grow(self, seq: EngineSequence) -> bool:
        """Room in the sequence's blocks for the slot this step writes."""
        alloc, kv = seq.alloc, seq.kv
        assert alloc is not None and kv is not None
        self.kv.ensure(alloc, kv.length + 1)
        seq.kv_stats = (alloc.new, alloc.reused, len(alloc.blocks))
        return True

    def accept_first(self, seq: EngineSequence, now: int) -> None:
        """A newly admitted sequence's first token: a context phase ends, others go on."""
        if seq.request.request_type is RequestType.CONTEXT_ONLY:
            self.finish_context(seq, now)
        else:
            self.accept(seq, now)

    def finish_context(self, seq: EngineSequence, now: int) -> None:
        """A context-only request ends here: one final output with the first token and the handoff."""
        req, alloc, first = seq.request, seq.alloc, seq.pending
        assert alloc is not None and first is not None
        crash = context_crash(self.name, seq.fault)
        if crash is not None:
            self.endings.fail(seq, crash)
            return
        ended = req.stop.is_end(first)
        tokens = () if ended else (first,)
        blob = None
        if not (ended or req.stop.finished(tokens) is not None):
            lease = self.leases.create(alloc, len(req.input_ids), owner=req.request_id)
            seq.alloc = None  # the lease holds the blocks now
            if seq.fault == "drop_lease":
                self.leases.drop(lease)
            blob = self.exchange.issue(req, first, lease, now)
        output = output_for(seq, tokens, now, context_phase_params=blob)
        self.endings.finish(seq)
        self.endings.deliver(seq, output, final=True)

    def accept(self, seq: EngineSequence, now: int) -> None:
        """The token this step computed joins the sequence; what is due goes out."""
        token = seq.pending
        assert token is not None
        if seq.fault != "none":
            crash = stream_crash(self.config, self.name, seq.fault, len(seq.generated))
            if crash is not None:
                self.endings.fail(seq, crash)
                return
        output, done = take_token(seq, token, now)
        if done:
            self.endings.finish(seq)
        if output is not None:
            self.endings.deliver(seq, output, final=done)
