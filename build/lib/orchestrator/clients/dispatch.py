"""One `EngineClient` over both kinds of engine endpoint (see `orchestrator.clients.endpoints`).

Local models go through BLS; `grpc://` engines through the remote gRPC client, which is
built (and `tritonclient` imported) only when it is first needed.

**A stream of many responses never travels over BLS.** Triton's python backend (2.51, and
still in python_backend's main branch) can deadlock a stub that reads a decoupled BLS
stream while another of its threads starts a BLS request: the starter holds the GIL and
waits for the stub's iterator-map lock; the stub's message thread holds that lock while
it delivers the stream's next response and waits for the iterator's lock; the stream's
reader, woken by the previous response, holds the iterator's lock and waits for the GIL
(README: "The BLS stub crash"). Python cannot order those locks, but a stream that
delivers one response cannot close the cycle: its reader is never woken twice. So with a
`loopback` address (this server's own gRPC endpoint), child requests that can answer
more than once (a streaming generation, or a whole request on one engine) go to local
engines over loopback gRPC; context phases, non-streaming requests and stops, one
response each, keep using BLS, which is cheaper for the large prompt tensors.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Callable, Mapping

import numpy as np

from orchestrator.clients.endpoints import parse_endpoint
from orchestrator.clients.engine_client import EngineClient, EngineReply
from orchestrator.wire.contract import RequestType, flag, is_stop_request


def grpc_client(requested_outputs: tuple[str, ...] = ()) -> EngineClient:
    from orchestrator.clients.remote import GrpcEngineClient

    return GrpcEngineClient(requested_outputs)


def answers_once(tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any]) -> bool:
    """Whether an engine answers this child request with exactly one response."""
    if parameters.get("request_type") == RequestType.CONTEXT_ONLY.value or is_stop_request(tensors):
        return True
    return not flag(tensors, "streaming")


class EndpointClient:
    """Sends each child request to the client that matches its engine's endpoint kind (and,
    with `loopback`, its local many-response streams over this server's gRPC endpoint)."""

    def __init__(
        self, local: EngineClient, remote_factory: Callable[[], EngineClient] = grpc_client, loopback: str = ""
    ) -> None:
        self.local = local
        self.loopback = loopback  # HOST:PORT of this server's gRPC endpoint, "" = BLS for everything local
        self._remote_factory = remote_factory
        self._remote: EngineClient | None = None

    def _remote_client(self) -> EngineClient:
        if self._remote is None:
            self._remote = self._remote_factory()
        return self._remote

    def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        if parse_endpoint(engine).remote:
            return self._remote_client().stream(engine, tensors, parameters, request_id)
        if self.loopback and not answers_once(tensors, parameters):
            return self._remote_client().stream(f"grpc://{self.loopback}/{engine}", tensors, parameters, request_id)
        return self.local.stream(engine, tensors, parameters, request_id)

    async def is_ready(self, engine: str) -> bool:
        """Readiness probes of local engines go over loopback gRPC too, when there is a
        loopback: a BLS `is_model_ready` still in flight when the server shuts down makes
        Triton 2.51 abort (`boost::interprocess::lock_exception` while it finalizes the
        asking stub; found by stopping `./scripts/serve` 7 times out of 7 with a probe due)."""
        if parse_endpoint(engine).remote:
            return await self._remote_client().is_ready(engine)
        if self.loopback:
            return await self._remote_client().is_ready(f"grpc://{self.loopback}/{engine}")
        return await self.local.is_ready(engine)

    async def close(self) -> None:
        close = getattr(self._remote, "close", None)
        if close is not None:
            await close()
