"""Telling engines to drop a child request: a `stop=true` request with the child's id.

Triton 2.51's BLS cannot cancel a child request, and a finished context phase's KV lease
has no request left to cancel at all; TensorRT-LLM's stop contract reaches both. Stops go
out in the background (a request never waits for them), each bounded by a timeout; the
engine's lease timeout is the backstop when one gets no answer.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from orchestrator.clients.engine_client import EngineClient
from orchestrator.wire.contract import stop_tensors


class ChildStops:
    """Background stop requests, counted and awaitable (shutdown, tests, the leak gauges)."""

    def __init__(self, client: EngineClient, timeout_s: float, log: Callable[[str], None]) -> None:
        self.client, self.timeout_s, self.log = client, timeout_s, log
        self.pending: set[asyncio.Task[None]] = set()
        self.sent = 0

    def send(self, engine: str, child_id: str) -> None:
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self._stop(engine, child_id))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def answered(self) -> None:
        """Wait until every stop sent so far has been answered (or timed out)."""
        while self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    async def _stop(self, engine: str, child_id: str) -> None:
        async def drain() -> None:
            async for reply in self.client.stream(engine, stop_tensors(), {}, child_id):
                if reply.error is not None:
                    self.log(
                        f"stop of {child_id} on engine {engine} failed ({reply.error.code.value}): {reply.error.message}"
                    )

        try:
            await asyncio.wait_for(drain(), self.timeout_s)
        except Exception as exc:
            self.log(f"stop of {child_id} on engine {engine} got no answer: {exc!r}")
