"""What an engine checks when a request arrives, before anything is queued.

Why apart from the scheduler (`core.py`): a request the engine cannot serve (a prompt
too long, more KV than the engine has, a full queue, an injected `fail`, a bad handoff)
is refused at once with a typed error and leaves nothing behind; these checks are
decided here, and the loop only ever sees sequences that passed them.
"""

from __future__ import annotations

from typing import Callable

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.faults import chosen_fault, refusal
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.kv_exchange import KvExchange
from orchestrator.stub_engine.sequence import EngineSequence, Sink, check_prompt, max_slots
from orchestrator.telemetry.recorder import Telemetry
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.contract import EngineRequest, RequestType
from orchestrator.wire.errors import InvalidInput, Overloaded


class Intake:
    """Turns a submitted request into an `EngineSequence`, or raises (nothing kept)."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        kv: KVCacheManager,
        exchange: KvExchange,
        telemetry: Telemetry,
        clock_ns: Callable[[], int],
    ) -> None:
        self.name = name
        self.config = config
        self.kv = kv
        self.exchange = exchange
        self.telemetry = telemetry
        self._clock_ns = clock_ns

    def sequence(self, request: EngineRequest, sink: Sink, fault: object, waiting: int) -> EngineSequence:
        """The request's sequence, with its fault chosen and its handoff checked. Raises
        InvalidInput when it cannot be served, Overloaded when `waiting` fills the queue,
        UNAVAILABLE for an injected `fail`.

        `fault` is the request parameter of that name (an injected fault for this request).
        """
        chosen = chosen_fault(self.config, request, fault)
        refused = refusal(self.name, chosen)
        if refused is not None:
            raise refused
        ids = request.input_ids
        check_prompt(ids, self.config.max_input_len, self.name)
        need = max_slots(request)
        if not self.kv.fits_empty(need):
            raise InvalidInput(
                f"the request needs {self.kv.blocks_for(need)} KV blocks (prompt + max_tokens = {need} tokens) but engine "
                f"'{self.name}' has {self.kv.pool.num_blocks}; lower max_tokens or raise max_tokens_in_paged_kv_cache"
            )
        self.check_queue(waiting)
        hashes = block_hashes(ids, self.config.tokens_per_block) if self.config.enable_kv_cache_reuse else []
        seq = EngineSequence(
            request=request, sink=sink, arrival_ns=self._clock_ns(), hashes=hashes, tokens=list(ids), fault=chosen
        )
        if request.request_type is RequestType.GENERATION_ONLY:
            seq.handoff = self.exchange.check(request, self._clock_ns())
        return seq

    def check_queue(self, waiting: int) -> None:
        """Refuse at once (Overloaded, counted) when `max_queued_requests` wait for admission:
        a queue that grows without bound only turns overload into memory and latency."""
        limit = self.config.max_queued_requests
        if limit and waiting >= limit:
            self.telemetry.inc("disagg_engine_rejected_total", {"engine": self.name, "reason": "overloaded"})
            raise Overloaded(
                f"engine '{self.name}' has {waiting} requests waiting for admission "
                f"(max_queued_requests={limit}); retry later, or raise max_queued_requests or add engines"
            )
