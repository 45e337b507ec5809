"""When each request's first token was produced, seen from the engine client.

Why here: simulated requests are not streamed (streaming every token through tensors
would cost more host time than the whole rest of the simulation), so the client sees
only the final response. The first token's time is read where it is produced instead:
the context phase's reply (the moment a streaming client would get it), or for a request
served on one engine, the `first_token_time_ns` perf output of its generation reply.
Both are virtual-loop times; a request's id is its child ids' prefix (`key:phase`).
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Mapping

import numpy as np

from orchestrator.clients.engine_client import EngineClient, EngineReply
from orchestrator.wire.contract import PerfMetrics


class TimingClient:
    """An EngineClient that records each request's first-token time (seconds) by request id."""

    def __init__(self, inner: EngineClient) -> None:
        self.inner = inner
        self.first_token_s: dict[str, float] = {}

    async def is_ready(self, engine: str) -> bool:
        return await self.inner.is_ready(engine)

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        key = request_id.rsplit(":", 1)[0]
        async for reply in self.inner.stream(engine, tensors, parameters, request_id):
            if key not in self.first_token_s and reply.tensors is not None:
                self._note(key, reply.tensors)
            yield reply

    def _note(self, key: str, tensors: Mapping[str, np.ndarray]) -> None:
        length = tensors.get("sequence_length")
        if length is None or int(length.reshape(-1)[0]) == 0:
            return
        perf = PerfMetrics.from_tensors(tensors)
        if perf is not None and perf.first_token_time_ns:
            self.first_token_s[key] = perf.first_token_time_ns / 1e9

    def take(self, key: str) -> float | None:
        """The request's first-token time, forgotten once read (the table stays small)."""
        return self.first_token_s.pop(key, None)
