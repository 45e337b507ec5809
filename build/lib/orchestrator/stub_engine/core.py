"""The stub engine core: one in-flight batching loop per engine model.

Each step takes one decode token from every running sequence plus as many queued
prompts as fit (`max_batch_size` sequences, `max_num_tokens` tokens, free KV blocks),
runs the model on the paged KV cache, waits out the cost model's duration of that step
(the stand-in for GPU time), then emits the step's tokens. New requests join between
steps and finished ones leave, so a long prefill in a step delays every running
sequence's next token, as on a GPU.

Phases (the `request_type` parameter):
- context_only: prefill, then one final output with the first token and a `Handoff`
  naming a lease on the prompt's KV blocks, which a generation engine pulls;
- generation_only: admitted with blocks for prompt + max_tokens, it pulls the missing
  KV blocks in the background (the loop keeps stepping the running batch meanwhile),
  joins the batch when they arrive, re-emits the first token, then decodes;
- aggregate (no parameter): prefill and decode here.

Outputs go to a `Sink` per request (the Triton adapter wraps a response sender); every
submitted request gets exactly one final output or one error, and every path (finish,
error, cancellation, stop, shutdown) gives its KV blocks back.

Load: at most `max_queued_requests` wait for admission; one more is refused at once
(`UNAVAILABLE: overloaded: ...`), never queued, so overload is answered instead of stored.

Ending a request early: Triton cancellation (polled every `cancel_check_ms`) ends it with
CANCELLED; `stop(request_id)` (TensorRT-LLM's `stop=true` request with the same id) ends
it with an empty final output and also drops a lease its context phase left unpulled.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.faults import chosen_fault
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.stub_engine.kv_cache import Allocation, KVCacheManager
from orchestrator.stub_engine.kv_exchange import KvExchange
from orchestrator.stub_engine.kv_layout import convert
from orchestrator.stub_engine.kv_store import KVStore
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.sequence import (
    EngineSequence,
    Sink,
    check_prompt,
    max_slots,
    output_for,
    partial_output,
    take_token,
)
from orchestrator.stub_engine.tiny_model import InductionModel, SequenceKV
from orchestrator.stub_engine.transfer import KVTransport
from orchestrator.telemetry.recorder import ENGINE_SPECS, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.contract import EngineOutput, EngineRequest, RequestType
from orchestrator.wire.errors import ErrorCode, InvalidInput, Overloaded, RequestError, as_request_error

MIN_IDLE_POLL_S = 0.005  # a loop with only queued or pulling requests sleeps at least this between checks
MAX_OVERLAP_S = 0.050  # host work after a step counted as overlapping the next step's GPU time, at most


class EngineCore:
    """Scheduler state and loop for one engine; every method runs on one asyncio loop."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        transport: KVTransport | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        telemetry: Telemetry | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        self.name = name
        self.telemetry = telemetry or Telemetry(MemoryRegistry(ENGINE_SPECS), deferred=False)
        self.config = config
        self.geometry = config.geometry
        self.model = InductionModel(self.geometry)
        self.store = KVStore(self.geometry, config.layout, config.num_kv_blocks, shared=True, label=name)
        self.kv = KVCacheManager(BlockPool(config.num_kv_blocks), config.tokens_per_block, config.enable_kv_cache_reuse)
        self.leases = LeaseTable(self.kv, config.kv_lease_timeout_s, on_release=self._wake)
        self.exchange = KvExchange(name, config, self.store, self.leases, keys, transport)
        self._clock_ns = clock_ns
        self._waiting: deque[EngineSequence] = deque()
        self._pulling: set[EngineSequence] = set()
        self._ready: deque[EngineSequence] = deque()  # KV arrived, waiting for a batch slot
        self._running: list[EngineSequence] = []
        self._stalled: list[EngineSequence] = []  # fault=stall: held, never answered
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()  # something finished or was released (wait_idle listens)
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._closed = False
        self._last_cancel_check = 0.0
        self._step_end_s = 0.0  # when the last step's modelled time ended (perf_counter)
        self.steps = 0
        self.step_log: list[tuple[int, int, int]] = []  # per step: (prefill tokens, decoding, admitted); tests read it

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start the KV transfer server (idempotent, concurrent callers share one start)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.exchange.start())
        await asyncio.shield(self._started)  # a caller cancelled mid-start must not cancel the start

    async def close(self) -> None:
        """Stop: fail whatever is in flight (UNAVAILABLE), free every block, unlink the store."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        error = RequestError(f"engine '{self.name}' is shutting down", ErrorCode.UNAVAILABLE)
        for seq in self._sequences():
            self._fail(seq, error)
        self._stalled.clear()
        self._waiting.clear()
        self._ready.clear()
        self._running.clear()
        self.leases.close()
        await self.exchange.close()
        self.store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- intake ---------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: Sink, fault: object = None) -> None:
        """Queue a request; raises InvalidInput (nothing queued) when it cannot be served,
        Overloaded when `max_queued_requests` already wait.

        `fault` is the request parameter of that name (an injected fault for this request).
        """
        if self._closed:
            raise RequestError(f"engine '{self.name}' is shut down", ErrorCode.UNAVAILABLE)
        if request.request_type is RequestType.CONTEXT_ONLY and not (self._started and self._started.done()):
            raise RequestError(
                f"bug: engine '{self.name}' got a context_only request before start()", ErrorCode.INTERNAL
            )
        fault = chosen_fault(self.config, request, fault)
        if fault == "fail":
            raise RequestError(f"engine '{self.name}' failed the request (injected fault)", ErrorCode.UNAVAILABLE)
        ids = request.input_ids
        check_prompt(ids, self.config.max_input_len, self.name)
        need = max_slots(request)
        if not self.kv.fits_empty(need):
            raise InvalidInput(
                f"the request needs {self.kv.blocks_for(need)} KV blocks (prompt + max_tokens = {need} tokens) but engine "
                f"'{self.name}' has {self.kv.pool.num_blocks}; lower max_tokens or raise max_tokens_in_paged_kv_cache"
            )
        self._check_queue()
        hashes = block_hashes(ids, self.config.tokens_per_block) if self.config.enable_kv_cache_reuse else []
        seq = EngineSequence(
            request=request, sink=sink, arrival_ns=self._clock_ns(), hashes=hashes, tokens=list(ids), fault=fault
        )
        if request.request_type is RequestType.GENERATION_ONLY:
            seq.handoff = self.exchange.check(request, self._clock_ns())
        if fault in ("hang", "stall"):
            self._stalled.append(seq)
            self._ensure_loop()  # its cancellation poll ends the stalled request
            return
        self._waiting.append(seq)
        self._ensure_loop()
        self._wake()

    def _check_queue(self) -> None:
        """Refuse at once (Overloaded, counted) when `max_queued_requests` wait for admission:
        a queue that grows without bound only turns overload into memory and latency."""
        limit = self.config.max_queued_requests
        if limit and self.waiting >= limit:
            self.telemetry.inc("disagg_engine_rejected_total", {"engine": self.name, "reason": "overloaded"})
            raise Overloaded(
                f"engine '{self.name}' has {self.waiting} requests waiting for admission "
                f"(max_queued_requests={limit}); retry later, or raise max_queued_requests or add engines"
            )

    @property
    def waiting(self) -> int:
        """Requests queued for admission (what `max_queued_requests` bounds)."""
        return len(self._waiting)

    def stop(self, request_id: str) -> int:
        """End the requests with this id wherever they are (an empty final output each) and drop
        the leases their context phases left; returns how many requests and leases ended.

        An id that matches nothing is fine: the request may have finished already.
        """
        if not request_id:
            raise InvalidInput(
                "a stop request needs the request id of the request to stop: send it as the request's id"
            )
        stopped = 0
        for seq in self._sequences():
            if seq.request.request_id == request_id and not seq.done:
                self._finish(seq)
                self._deliver(seq, output_for(seq, partial_output(seq), self._clock_ns()), final=True)
                stopped += 1
        self._prune()
        return stopped + self.leases.drop_owned(request_id)

    def _sequences(self) -> list[EngineSequence]:
        return [*self._waiting, *self._pulling, *self._ready, *self._running, *self._stalled]

    @property
    def active(self) -> int:
        """Requests not yet finished (queued, pulling, ready or running)."""
        return len(self._waiting) + len(self._pulling) + len(self._ready) + len(self._running) + len(self._stalled)

    def state(self) -> dict[str, int]:
        """What this engine holds now (exported as gauges; all zero when idle and leak-free)."""
        return {
            "active_requests": self.active,
            "leases": len(self.leases),
            "kv_blocks_in_use": sum(1 for n in self.kv.pool.ref_count if n),
            "kv_blocks_reserved": self.kv.reserved,
        }

    def capacity(self) -> dict[str, int]:
        """Free blocks (empty or holding a reusable prefix) and blocks holding a prefix (exported)."""
        return {"kv_blocks_free": self.kv.pool.num_free, "kv_blocks_cached": self.kv.pool.num_cached}

    def check_idle(self) -> None:
        """Assert nothing is held: no request, no lease, every block free (tests' leak check)."""
        assert self.active == 0, f"{self.active} requests still active on '{self.name}'"
        assert len(self.leases) == 0, f"{len(self.leases)} leases still held on '{self.name}'"
        self.kv.check_idle()

    # -- loop -----------------------------------------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()
        self._changed.set()

    async def wait_idle(self) -> None:
        """Return once no request is active and no lease is held (leases may take their timeout)."""
        while self.active or len(self.leases):
            self._changed.clear()
            await self._changed.wait()

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.name}")

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            decoding = list(self._running)  # before admission: a new sequence's first step is its prefill
            admitted = self._admit()
            if not decoding and not admitted:
                self._wakeup.clear()
                if not self.active:
                    await self._wakeup.wait()
                else:  # queued for memory or pulling: wake on news, and look for cancellations now and then
                    try:
                        await asyncio.wait_for(
                            self._wakeup.wait(), max(MIN_IDLE_POLL_S, self.config.cancel_check_ms / 1e3)
                        )
                    except asyncio.TimeoutError:
                        pass
                continue
            await self._step(decoding, admitted)

    async def _step(self, decoding: list[EngineSequence], admitted: list[EngineSequence]) -> None:
        # The host work since the last step's modelled time ended (streaming its outputs,
        # scheduling) overlaps this step's GPU time, as in a real engine, whose GPU computes
        # the next step while the CPU sends responses: count it, up to one step's worth.
        now_s = time.perf_counter()
        started = self._step_end_s if now_s - self._step_end_s <= MAX_OVERLAP_S else now_s
        prefill_tokens = 0
        for seq in admitted:
            if seq.handoff is None:
                prefill_tokens += self._guarded(seq, self._prefill, seq) or 0
            else:
                seq.pending = seq.handoff.first_token
        kv_tokens = self._decode(decoding)
        self.steps += 1
        self.step_log.append((prefill_tokens, len(decoding), len(admitted)))
        cost = self.config.step_seconds(prefill_tokens, len(decoding), kv_tokens)
        if any(s.fault == "slow" for s in (*admitted, *decoding)):
            cost += self.config.fault_delay_ms / 1e3
        await asyncio.sleep(max(0.0, cost - (time.perf_counter() - started)))
        self._step_end_s = time.perf_counter()
        now = self._clock_ns()
        for seq in admitted:
            if not seq.done:
                seq.first_token_ns = now
                self._guarded(seq, self._accept_first, seq, now)
        for seq in decoding:
            if not seq.done:
                self._guarded(seq, self._accept, seq, now)
        self._running = [s for s in self._running if not s.done]

    def _admit(self) -> list[EngineSequence]:
        """Move sequences into this step while batch, token budget and KV blocks allow (FCFS)."""
        admitted: list[EngineSequence] = []
        budget = self.config.max_num_tokens - len(self._running)
        now = self._clock_ns()

        def room() -> bool:
            return len(self._running) + len(admitted) < self.config.max_batch_size

        while self._ready and room() and budget >= 1:  # pulled KV first: it already holds memory
            seq = self._ready.popleft()
            budget -= 1
            admitted.append(seq)
        while self._waiting and room():
            seq = self._waiting[0]
            if seq.handoff is not None:
                if not self._start_pull(seq):
                    break  # not enough free blocks yet: wait (FCFS, no overtaking)
                self._waiting.popleft()
                continue
            cached = len(self.kv.match(seq.hashes)) * self.config.tokens_per_block
            cost = max(1, seq.prompt_tokens - cached)
            never_fits = cost > self.config.max_num_tokens
            if cost > budget and (admitted or not never_fits):
                break  # wait for room; a prompt that can never fit runs as its step's only prefill
            alloc = self.kv.admit(seq.request.input_ids, max_slots(seq.request), seq.hashes)
            if alloc is None:
                break  # wait for blocks
            self._waiting.popleft()
            self._hold(seq, alloc)
            budget -= cost
            seq.first_scheduled_ns = now
            admitted.append(seq)
        self._running.extend(admitted)
        return admitted

    def _hold(self, seq: EngineSequence, alloc: Allocation) -> None:
        seq.alloc = alloc
        seq.kv = SequenceKV(key=seq.request.sampling.key(), table=alloc.blocks)
        seq.kv_stats = (alloc.new, alloc.reused, len(alloc.blocks))
        engine = {"engine": self.name}
        self.telemetry.inc("disagg_engine_prefix_hit_blocks_total", engine, alloc.reused)
        self.telemetry.inc(
            "disagg_engine_new_blocks_total", engine, self.kv.blocks_for(seq.prompt_tokens) - alloc.reused
        )
        queued_s = max(0, self._clock_ns() - seq.arrival_ns) / 1e9
        self.telemetry.observe(
            "disagg_engine_queue_seconds", {**engine, "phase": seq.request.request_type.value}, queued_s
        )

    # -- KV pulls (generation_only) ----------------------------------------------------
    def _start_pull(self, seq: EngineSequence) -> bool:
        handoff = seq.handoff
        assert handoff is not None
        last_block = self.kv.blocks_for(handoff.num_tokens) - 1
        alloc = self.kv.admit(seq.request.input_ids, max_slots(seq.request), seq.hashes, max_hits=last_block)
        if alloc is None:
            return False
        self._hold(seq, alloc)
        seq.first_scheduled_ns = self._clock_ns()
        self._pulling.add(seq)
        seq.pull = asyncio.get_running_loop().create_task(self._pull(seq), name=f"pull-{seq.request.request_id}")
        return True

    async def _pull(self, seq: EngineSequence) -> None:
        handoff, alloc, kv = seq.handoff, seq.alloc, seq.kv
        assert handoff is not None and alloc is not None and kv is not None
        started = time.perf_counter()
        try:
            first, count = alloc.reused, self.kv.blocks_for(handoff.num_tokens) - alloc.reused
            shards = await self.exchange.pull(handoff, first, count)
            self.store.write_blocks(
                alloc.blocks[first : first + count], convert(self.geometry, handoff.layout, self.config.layout, shards)
            )
            kv.length = handoff.num_tokens
            self.model.reindex(self.store, kv)
            self.kv.commit(alloc, seq.tokens)
            self.exchange.pulled_ok(handoff, self._clock_ns())
            pulled_tokens = handoff.num_tokens - first * self.config.tokens_per_block
            await asyncio.sleep(max(0.0, self.config.transfer_seconds(pulled_tokens) - (time.perf_counter() - started)))
            engine = {"engine": self.name}
            self.telemetry.observe("disagg_engine_kv_transfer_seconds", engine, time.perf_counter() - started)
            self.telemetry.observe("disagg_engine_kv_transfer_bytes", engine, float(getattr(shards, "nbytes", 0)))
        except asyncio.CancelledError:
            raise  # whoever cancelled (cancellation, shutdown) has ended the sequence
        except Exception as exc:
            self._pulling.discard(seq)
            self._fail(seq, as_request_error(exc))
            return
        self._pulling.discard(seq)
        if seq.done:
            return
        self._ready.append(seq)
        self._wake()

    # -- per-sequence work ----------------------------------------------------------
    def _guarded(self, seq: EngineSequence, fn: Callable[..., int | None], *args: object) -> int | None:
        """Run one sequence's work; a failure ends that sequence only, with a typed error."""
        try:
            return fn(*args)
        except Exception as exc:
            self._fail(seq, as_request_error(exc))
            return None

    def _prefill(self, seq: EngineSequence) -> int:
        """Write the prompt's uncached K/V and compute the first token; returns tokens computed."""
        alloc, kv = seq.alloc, seq.kv
        assert alloc is not None and kv is not None
        ids = seq.request.input_ids
        kv.length = alloc.cached_tokens
        self.model.reindex(self.store, kv)
        if kv.length < len(ids):
            previous = ids[kv.length - 1] if kv.length else None
            self.model.write(self.store, kv, ids[kv.length :], previous)
        self.kv.commit(alloc, seq.tokens)
        seq.pending = self.model.next_token(self.store, kv)
        return max(1, len(ids) - alloc.cached_tokens)

    def _decode(self, seqs: list[EngineSequence]) -> int:
        """Write each sequence's last accepted token and compute its next, as one batched model
        call (per-sequence numpy calls cost ~120 us each, more than a modelled decode step can
        hide at batch 64); returns the KV tokens attended."""
        batch: list[EngineSequence] = []
        for seq in seqs:
            if self._guarded(seq, self._grow, seq):
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
                self._fail(seq, as_request_error(exc))
            return 0
        attended = 0
        for seq, token in zip(batch, nexts):
            seq.pending = token
            self._guarded(seq, self.kv.commit, seq.alloc, seq.tokens)
            attended += seq.kv.length  # type: ignore[union-attr]
        return attended

    def _grow(self, seq: EngineSequence) -> bool:
        """Room in the sequence's blocks for the slot this step writes."""
        alloc, kv = seq.alloc, seq.kv
        assert alloc is not None and kv is not None
        self.kv.ensure(alloc, kv.length + 1)
        seq.kv_stats = (alloc.new, alloc.reused, len(alloc.blocks))
        return True

    def _accept_first(self, seq: EngineSequence, now: int) -> None:
        if seq.request.request_type is RequestType.CONTEXT_ONLY:
            self._finish_context(seq, now)
        else:
            self._accept(seq, now)

    def _finish_context(self, seq: EngineSequence, now: int) -> None:
        """A context-only request ends here: one final output with the first token and the handoff."""
        req, alloc, first = seq.request, seq.alloc, seq.pending
        assert alloc is not None and first is not None
        if seq.fault == "crash":
            self._fail(
                seq,
                RequestError(
                    f"engine '{self.name}' crashed before the context response (injected fault)", ErrorCode.UNAVAILABLE
                ),
            )
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
        self._finish(seq)
        self._deliver(seq, output, final=True)

    def _accept(self, seq: EngineSequence, now: int) -> None:
        token = seq.pending
        assert token is not None
        if seq.fault == "crash" and len(seq.generated) >= self.config.fault_after_tokens:
            self._fail(
                seq, RequestError(f"engine '{self.name}' crashed mid-stream (injected fault)", ErrorCode.UNAVAILABLE)
            )
            return
        output, done = take_token(seq, token, now)
        if done:
            self._finish(seq)
        if output is not None:
            self._deliver(seq, output, final=done)

    def _deliver(self, seq: EngineSequence, output: EngineOutput, final: bool) -> None:
        seq.closed = final
        seq.sink.send(output, final)

    def _finish(self, seq: EngineSequence) -> None:
        """End a sequence and give back its blocks (idempotent; the loop drops it from the batch)."""
        seq.done = True
        if seq.pull is not None and not seq.pull.done() and seq.pull is not asyncio.current_task():
            seq.pull.cancel()
        self._pulling.discard(seq)
        if seq.alloc is not None:
            self.kv.release(seq.alloc)
            seq.alloc = None
        self._wake()

    def _fail(self, seq: EngineSequence, error: RequestError) -> None:
        self._finish(seq)
        if seq.closed:
            return
        seq.closed = True
        try:
            seq.sink.fail(error)
        except Exception:
            pass

    def _drop_cancelled(self) -> None:
        """End every request whose client cancelled it, wherever it is (every cancel_check_ms)."""
        now = time.monotonic()
        if now - self._last_cancel_check < self.config.cancel_check_ms / 1e3:
            return
        self._last_cancel_check = now
        cancelled = RequestError("request cancelled by the client", ErrorCode.CANCELLED)
        for seq in self._sequences():
            try:
                gone = seq.sink.cancelled()
            except Exception:
                gone = True
            if gone:
                self._fail(seq, cancelled)
        self._prune()

    def _prune(self) -> None:
        """Forget ended sequences in every queue (the running batch is also pruned each step)."""
        if any(s.done for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.done)
        if any(s.done for s in self._ready):
            self._ready = deque(s for s in self._ready if not s.done)
        self._running = [s for s in self._running if not s.done]
        self._stalled = [s for s in self._stalled if not s.done]
