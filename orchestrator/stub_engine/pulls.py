"""A generation_only request's KV arriving: pulled in the background, then ready for the batch.

Why apart from the scheduler (`core.py`): a pull takes as long as the transfer, and the
loop keeps stepping the running batch meanwhile; this module runs that task (fetch the
lease's blocks through `KvExchange`, convert them to this engine's layout, write them,
wait out the modelled transfer time) and hands the sequence back as ready, or fails it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from orchestrator.stub_engine.backing import BlockStore, ModelRules
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.endings import Endings
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.kv_exchange import KvExchange
from orchestrator.stub_engine.kv_layout import convert
from orchestrator.stub_engine.queues import SequenceQueues
from orchestrator.stub_engine.sequence import EngineSequence
from orchestrator.telemetry.recorder import Telemetry
from orchestrator.wire.errors import as_request_error


class KvPulls:
    """Runs the pulls of engine `name`: a sequence in `queues.pulling` moves to `queues.ready`."""

    def __init__(
        self, name: str, config: EngineConfig, model: ModelRules, store: BlockStore, kv: KVCacheManager,
        exchange: KvExchange, telemetry: Telemetry, queues: SequenceQueues, endings: Endings,
        wake: Callable[[], None], clock: EngineClock,
    ) -> None:  # fmt: skip
        self.name, self.config, self.model, self.store, self.kv = name, config, model, store, kv
        self.exchange, self.telemetry, self.queues, self.endings = exchange, telemetry, queues, endings
        self.geometry = config.geometry
        self._wake = wake
        self._clock_ns = clock.now_ns
        self._elapsed = clock.elapsed_s

    def begin(self, seq: EngineSequence) -> None:
        """Start pulling the KV of an admitted sequence (its blocks already held)."""
        self.queues.pulling.add(seq)
        seq.pull = asyncio.get_running_loop().create_task(self._pull(seq), name=f"pull-{seq.request.request_id}")

    async def _pull(self, seq: EngineSequence) -> None:
        handoff, alloc, kv = seq.handoff, seq.alloc, seq.kv
        assert handoff is not None and alloc is not None and kv is not None
        started = self._elapsed()
        try:
            first, count = alloc.reused, self.kv.blocks_for(handoff.num_tokens) - alloc.reused
            shards = await self.exchange.pull(handoff, first, count)
            self.store.write_blocks(
                alloc.blocks[first : first + count], convert(self.geometry, handoff.layout, self.config.layout, shards)
            )
            kv.length = handoff.num_tokens
            self.model.reindex(self.store, kv)
            self.kv.commit(alloc, seq.tokens, seq.hashes)
            self.exchange.pulled_ok(handoff, self._clock_ns())
            pulled_tokens = handoff.num_tokens - first * self.config.tokens_per_block
            await asyncio.sleep(max(0.0, self.config.transfer_seconds(pulled_tokens) - (self._elapsed() - started)))
            engine = {"engine": self.name}
            self.telemetry.observe("disagg_engine_kv_transfer_seconds", engine, self._elapsed() - started)
            self.telemetry.observe("disagg_engine_kv_transfer_bytes", engine, float(getattr(shards, "nbytes", 0)))
        except asyncio.CancelledError:
            raise  # whoever cancelled (cancellation, shutdown) has ended the sequence
        except Exception as exc:
            self.queues.pulling.discard(seq)
            self.endings.fail(seq, as_request_error(exc))
            return
        self.queues.pulling.discard(seq)
        if seq.done:
            return
        self.queues.ready.append(seq)
        self._wake()
