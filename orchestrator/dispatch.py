"""One `EngineClient` over both kinds of engine endpoint (see `orchestrator.endpoints`).

Local models go through BLS; `grpc://` engines through the remote gRPC client, which is
built (and `tritonclient` imported) only when a pool names a remote engine, so a
single-server deployment needs nothing beyond the python backend.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from orchestrator.endpoints import parse_endpoint
from orchestrator.engine_client import EngineClient, EngineReply


def _grpc_client() -> EngineClient:
    from orchestrator.remote import GrpcEngineClient  # noqa: PLC0415 - optional dependency

    return GrpcEngineClient()


class EndpointClient:
    """Sends each child request to the client that matches its engine's endpoint kind."""

    def __init__(self, local: EngineClient, remote_factory: Callable[[], EngineClient] = _grpc_client) -> None:
        self.local = local
        self._remote_factory = remote_factory
        self._remote: EngineClient | None = None

    def _client(self, engine: str) -> EngineClient:
        if not parse_endpoint(engine).remote:
            return self.local
        if self._remote is None:
            self._remote = self._remote_factory()
        return self._remote

    def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[EngineReply]:
        return self._client(engine).stream(engine, tensors, parameters, request_id)

    async def is_ready(self, engine: str) -> bool:
        return await self._client(engine).is_ready(engine)

    async def close(self) -> None:
        close = getattr(self._remote, "close", None)
        if close is not None:
            await close()
