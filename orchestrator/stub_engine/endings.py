"""How requests end inside an engine: finished, failed, stopped or cancelled by the client.

Why apart from the scheduler (`core.py`): every way out (a last token, an error, a
`stop=true`, a client's cancellation, shutdown) must give the request's KV blocks back
and send exactly one final output or error; writing those rules once here keeps the
loop to deciding what runs when.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.queues import SequenceQueues
from orchestrator.stub_engine.sequence import EngineSequence, output_for, partial_output
from orchestrator.wire.contract import EngineOutput
from orchestrator.wire.errors import ErrorCode, InvalidInput, RequestError


class Endings:
    """Ends the sequences in `queues`: gives back their blocks, sends their one final answer."""

    def __init__(
        self,
        queues: SequenceQueues,
        kv: KVCacheManager,
        leases: LeaseTable,
        wake: Callable[[], None],
        clock_ns: Callable[[], int],
        cancel_check_s: float,
    ) -> None:
        self.queues = queues
        self.kv = kv
        self.leases = leases
        self._wake = wake  # the loop looks again: blocks came free, a sequence left
        self._clock_ns = clock_ns
        self._cancel_check_s = cancel_check_s
        self._last_cancel_check = 0.0

    def deliver(self, seq: EngineSequence, output: EngineOutput, final: bool) -> None:
        seq.closed = final
        seq.sink.send(output, final)

    def finish(self, seq: EngineSequence) -> None:
        """End a sequence and give back its blocks (idempotent; the loop drops it from the batch)."""
        seq.done = True
        if seq.pull is not None and not seq.pull.done() and seq.pull is not asyncio.current_task():
            seq.pull.cancel()
        self.queues.pulling.discard(seq)
        if seq.alloc is not None:
            self.kv.release(seq.alloc)
            seq.alloc = None
        self._wake()

    def fail(self, seq: EngineSequence, error: RequestError) -> None:
        """End a sequence with `error`, unless its final answer already went out."""
        self.finish(seq)
        if seq.closed:
            return
        seq.closed = True
        try:
            seq.sink.fail(error)
        except Exception:
            pass

    def stop(self, request_id: str) -> int:
        """End the requests with this id (an empty final output each) and drop the leases their
        context phases left; returns how many requests and leases ended."""
        if not request_id:
            raise InvalidInput(
                "a stop request needs the request id of the request to stop: send it as the request's id"
            )
        stopped = 0
        for seq in self.queues.all():
            if seq.request.request_id == request_id and not seq.done:
                self.finish(seq)
                self.deliver(seq, output_for(seq, partial_output(seq), self._clock_ns()), final=True)
                stopped += 1
        self.queues.prune()
        return stopped + self.leases.drop_owned(request_id)

    def drop_cancelled(self) -> None:
        """End every request whose client cancelled it, wherever it is (every cancel_check_ms);
        a sink that cannot say counts as gone."""
        now = time.monotonic()
        if now - self._last_cancel_check < self._cancel_check_s:
            return
        self._last_cancel_check = now
        cancelled = RequestError("request cancelled by the client", ErrorCode.CANCELLED)
        for seq in self.queues.all():
            try:
                gone = seq.sink.cancelled()
            except Exception:
                gone = True
            if gone:
                self.fail(seq, cancelled)
        self.queues.prune()
