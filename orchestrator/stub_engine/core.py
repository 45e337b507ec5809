"""The stub engine core: one in-flight batching loop per engine model.

Each step takes one decode token from every running sequence plus as many queued
prompts as fit (`max_batch_size` sequences, `max_num_tokens` tokens, free KV blocks),
runs the model on the paged KV cache, waits out the cost model's duration of that step
(the stand-in for GPU time), then emits the step's tokens. New requests join between
steps and finished ones leave, so a long prefill in a step delays every running
sequence's next token, as on a GPU.

With `enable_chunked_context` (off by default, as in TensorRT-LLM) a prompt's prefill is
split over steps instead (`chunking.py`): each step's budget, `max_num_tokens` less one
token per decoding sequence, goes first to prompts part-way through their prefill, then
to new prompts' first chunks, in whole blocks but for a prompt's last chunk. The running
sequences decode in every one of those steps; the first token comes after the last chunk.
KV blocks for the whole request are still taken at admission.

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

This module is the scheduler: the loop, a step, admission. The rest is composed in, one
concern each: `intake.py` (what is checked before queueing), `queues.py` (where each
sequence is), `chunking.py` (how much of each prompt a step prefills), `model_work.py`
(the model's work per sequence), `pulls.py` (KV arriving for generation_only),
`endings.py` (finish, fail, stop, cancellation), `faults.py`.
"""

from __future__ import annotations

import asyncio

from orchestrator.stub_engine.backing import backing
from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.chunking import Chunk, continuing, next_chunk
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.endings import Endings
from orchestrator.stub_engine.faults import HELD, slow_step_s
from orchestrator.stub_engine.intake import Intake
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.stub_engine.kv_cache import Allocation, KVCacheManager
from orchestrator.stub_engine.kv_exchange import KvExchange
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.model_work import SequenceWork
from orchestrator.stub_engine.pulls import KvPulls
from orchestrator.stub_engine.queues import SequenceQueues
from orchestrator.stub_engine.sequence import EngineSequence, Sink, max_slots
from orchestrator.stub_engine.tiny_model import SequenceKV
from orchestrator.stub_engine.transfer import KVTransport
from orchestrator.telemetry.recorder import ENGINE_SPECS, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.contract import EngineRequest, RequestType
from orchestrator.wire.errors import ErrorCode, RequestError

MIN_IDLE_POLL_S = 0.005  # a loop with only queued or pulling requests sleeps at least this between checks
MAX_OVERLAP_S = 0.050  # host work after a step counted as overlapping the next step's GPU time, at most


class EngineCore:
    """Scheduler state and loop for one engine; every method runs on one asyncio loop."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        transport: KVTransport | None = None,
        clock: EngineClock | None = None,
        telemetry: Telemetry | None = None,
        keys: KeyRing | None = None,
        symbolic: bool = False,
    ) -> None:
        """`symbolic`: no K/V data and no transfer server (the simulator: `backing.py`); its
        KV pulls go through `transport`, which must then be given."""
        if symbolic and transport is None:
            raise ValueError("a symbolic engine serves no transfer server: give it an in-process transport")
        self.name = name
        self.telemetry = telemetry or Telemetry(MemoryRegistry(ENGINE_SPECS), deferred=False)
        self.config = config
        self.geometry = config.geometry
        self.model, self.store = backing(name, config, symbolic)
        self.kv = KVCacheManager(BlockPool(config.num_kv_blocks), config.tokens_per_block, config.enable_kv_cache_reuse)
        self.leases = LeaseTable(self.kv, config.kv_lease_timeout_s, on_release=self._wake)
        self.exchange = KvExchange(name, config, self.store, self.leases, keys, transport, listen=not symbolic)
        self.clock = clock = clock or EngineClock()
        clock_ns = self._clock_ns = clock.now_ns
        self.queues = SequenceQueues()
        self.intake = Intake(name, config, self.kv, self.exchange, self.telemetry, clock_ns)
        self.endings = Endings(self.queues, self.kv, self.leases, self._wake, clock_ns, config.cancel_check_ms / 1e3)
        self.work = SequenceWork(
            name, config, self.model, self.store, self.kv, self.leases, self.exchange, self.endings
        )
        self.pulls = KvPulls(
            name, config, self.model, self.store, self.kv, self.exchange, self.telemetry, self.queues,
            self.endings, self._wake, clock,
        )  # fmt: skip
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()  # something finished or was released (wait_idle listens)
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._closed = False
        self._step_end_s = 0.0  # when the last step's modelled time ended (clock.elapsed_s)
        self.steps = 0
        # Per step (tests read it): (prefill tokens computed, sequences decoded, sequences
        # that joined the batch: a whole prompt, a prompt's first chunk or pulled KV). A later chunk
        # of an admitted prompt counts in prefill tokens only.
        self.step_log: list[tuple[int, int, int]] = []

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
        for seq in self.queues.all():
            self.endings.fail(seq, error)
        self.queues.clear()
        self.leases.close()
        await self.exchange.close()
        self.store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- intake ---------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: Sink, fault: object = None) -> None:
        """Queue a request; raises InvalidInput (nothing queued) when it cannot be served,
        Overloaded when `max_queued_requests` already wait (the checks: intake.py).

        `fault` is the request parameter of that name (an injected fault for this request).
        """
        if self._closed:
            raise RequestError(f"engine '{self.name}' is shut down", ErrorCode.UNAVAILABLE)
        if request.request_type is RequestType.CONTEXT_ONLY and not (self._started and self._started.done()):
            raise RequestError(
                f"bug: engine '{self.name}' got a context_only request before start()", ErrorCode.INTERNAL
            )
        seq = self.intake.sequence(request, sink, fault, self.waiting)
        if seq.fault in HELD:
            self.queues.stalled.append(seq)
            self._ensure_loop()  # its cancellation poll ends the stalled request
            return
        self.queues.waiting.append(seq)
        self._ensure_loop()
        self._wake()

    @property
    def waiting(self) -> int:
        """Requests queued for admission (what `max_queued_requests` bounds)."""
        return len(self.queues.waiting)

    def stop(self, request_id: str) -> int:
        """End the requests with this id wherever they are (an empty final output each) and drop
        the leases their context phases left; returns how many requests and leases ended.

        An id that matches nothing is fine: the request may have finished already.
        """
        return self.endings.stop(request_id)

    @property
    def active(self) -> int:
        """Requests not yet finished (queued, pulling, ready or running)."""
        return self.queues.active

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
            self.endings.drop_cancelled()
            decoding = list(self.queues.running)  # before admission: a new sequence's first step is its prefill
            admitted, chunks = self._admit()
            if not decoding and not admitted and not chunks:
                self._wakeup.clear()
                self._step_end_s = float("-inf")  # time spent waiting is not host work to overlap with a step
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
            await self._step(decoding, admitted, chunks)

    async def _step(self, decoding: list[EngineSequence], admitted: list[EngineSequence], chunks: list[Chunk]) -> None:
        """Run one step: the prefill `chunks` (whole prompts without chunking), one decode token
        of each `decoding` sequence, and the first token of each sequence whose prompt is now
        complete (its last chunk, or pulled KV among `admitted`)."""
        # The host work since the last step's modelled time ended (streaming its outputs,
        # scheduling) overlaps this step's GPU time, as in a real engine, whose GPU computes
        # the next step while the CPU sends responses: count it, up to one step's worth.
        elapsed = self.clock.elapsed_s
        now_s = elapsed()
        started = self._step_end_s if now_s - self._step_end_s <= MAX_OVERLAP_S else now_s
        pulled = [seq for seq in admitted if seq.handoff is not None]
        for seq in admitted:
            if seq.handoff is not None:  # its KV arrived: its first token came with the handoff
                seq.pending = seq.handoff.first_token
        prefill_tokens = 0
        for chunk in chunks:
            prefill_tokens += self.work.guarded(chunk.seq, self.work.prefill, chunk.seq, chunk.tokens) or 0
        kv_tokens = self.work.decode(decoding)
        self.steps += 1
        self.step_log.append((prefill_tokens, len(decoding), len(admitted)))
        cost = self.config.step_seconds(prefill_tokens, len(decoding), kv_tokens)
        cost += slow_step_s(self.config, (s.fault for s in (*admitted, *(c.seq for c in chunks), *decoding)))
        deadline = started + cost
        await asyncio.sleep(max(0.0, deadline - elapsed()))
        # The step ends at its deadline, not when the loop woke up: a late wake-up (timer slack,
        # a busy host) is host time the next step absorbs, so steps keep the modelled cadence.
        self._step_end_s = deadline
        now = self._clock_ns()
        for seq in (*pulled, *(c.seq for c in chunks if c.last)):
            if not seq.done:
                seq.first_token_ns = now
                self.work.guarded(seq, self.work.accept_first, seq, now)
        for seq in decoding:
            if not seq.done:
                self.work.guarded(seq, self.work.accept, seq, now)
        self.queues.running = [s for s in self.queues.running if not s.done]
        self.queues.prefilling = [s for s in self.queues.prefilling if not s.done]

    def _admit(self) -> tuple[list[EngineSequence], list[Chunk]]:
        """Pick this step's work (FCFS) while batch slots, token budget and KV blocks allow:
        pulled KV first, then the next chunk of each prompt part-way through its prefill,
        then queued prompts (whole, or a first chunk: `chunking.py`). Returns the sequences
        that join the batch now and the prefill chunks the step computes."""
        q, cfg = self.queues, self.config
        admitted: list[EngineSequence] = []
        budget = cfg.max_num_tokens - len(q.running)
        now = self._clock_ns()

        def room() -> bool:
            return len(q.running) + len(q.prefilling) + len(admitted) < cfg.max_batch_size

        while q.ready and room() and budget >= 1:  # pulled KV first: it already holds memory
            seq = q.ready.popleft()
            budget -= 1
            admitted.append(seq)
        chunks = continuing(q.prefilling, budget, cfg.tokens_per_block)
        budget -= sum(c.cost for c in chunks)
        while q.waiting and room():
            seq = q.waiting[0]
            if seq.handoff is not None:
                if not self._start_pull(seq):
                    break  # not enough free blocks yet: wait (FCFS, no overtaking)
                q.waiting.popleft()
                continue
            left = seq.prompt_tokens - len(self.kv.match(seq.hashes)) * cfg.tokens_per_block
            chunk = next_chunk(seq, left, budget, cfg.tokens_per_block, cfg.enable_chunked_context)
            if chunk is None:
                if cfg.enable_chunked_context or admitted or left <= cfg.max_num_tokens:
                    break  # wait for room
                chunk = Chunk(seq, left, last=True)  # unchunked, it can never fit: its step's only prefill
            alloc = self.kv.admit(seq.request.input_ids, max_slots(seq.request), seq.hashes)
            if alloc is None:
                break  # wait for blocks
            q.waiting.popleft()
            self._hold(seq, alloc)
            budget -= chunk.cost
            seq.first_scheduled_ns = now
            admitted.append(seq)
            chunks.append(chunk)
        # The batch: a sequence whose prompt is complete after this step runs, the others prefill on.
        complete = {c.seq for c in chunks if c.last}
        started = [s for s in admitted if s.handoff is None and s not in complete]
        q.running.extend([*(s for s in q.prefilling if s in complete), *(s for s in admitted if s not in started)])
        q.prefilling = [*(s for s in q.prefilling if s not in complete), *started]
        return admitted, chunks

    def _hold(self, seq: EngineSequence, alloc: Allocation) -> None:
        """The sequence holds `alloc` now (its model view of the blocks); counts reuse and queue time."""
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

    def _start_pull(self, seq: EngineSequence) -> bool:
        """Admit a generation_only sequence when blocks for all of it are free (the prompt's
        cached prefix reused), and start pulling the rest of its KV (pulls.py)."""
        handoff = seq.handoff
        assert handoff is not None
        last_block = self.kv.blocks_for(handoff.num_tokens) - 1
        alloc = self.kv.admit(seq.request.input_ids, max_slots(seq.request), seq.hashes, max_hits=last_block)
        if alloc is None:
            return False
        self._hold(seq, alloc)
        seq.first_scheduled_ns = self._clock_ns()
        self.pulls.begin(seq)
        return True
