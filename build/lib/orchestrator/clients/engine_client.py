"""How the orchestrator reaches an engine: one streaming call per child request.

`EngineClient.stream` sends the contract's tensors plus request parameters to a named
engine and yields its replies as they arrive. Implementations:

- `orchestrator.clients.bls.BlsEngineClient`: Triton BLS inside the python backend (production);
- `InProcessEngineClient` below: stub `EngineCore`s on the caller's asyncio loop, used by
  tests to run the real pipeline and the real engine through the same tensors, no Triton.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Mapping, Protocol

import numpy as np

from orchestrator.wire.contract import EngineOutput, EngineRequest, is_stop_request, parse_request
from orchestrator.wire.errors import ErrorCode, RequestError


@dataclass(frozen=True, slots=True)
class EngineReply:
    """One engine response: tensors, or the engine's error (code and message)."""

    tensors: Mapping[str, np.ndarray] | None = None
    error: RequestError | None = None


class EngineClient(Protocol):
    def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        """One child request; closing the iterator early abandons (and where possible cancels) it."""
        ...

    async def is_ready(self, engine: str) -> bool:
        """Whether the engine is loaded and ready to take requests (the readiness probe)."""
        ...


class InProcessEngineClient:
    """Engines as `EngineCore` objects on this loop, reached through real tensors."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.engines = dict(engines)

    async def is_ready(self, engine: str) -> bool:
        core = self.engines.get(engine)
        return core is not None and not core.closed

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        core = self.engines.get(engine)
        if core is None:
            yield EngineReply(error=RequestError(f"engine '{engine}' is not loaded", ErrorCode.UNAVAILABLE))
            return
        queue: asyncio.Queue[tuple[EngineReply, bool]] = asyncio.Queue()
        abandoned = False  # the consumer stopped listening: the engine sees a cancellation

        class _Sink:
            def __init__(self, request: EngineRequest) -> None:
                self.request = request

            def send(self, output: EngineOutput, final: bool) -> None:
                queue.put_nowait((EngineReply(tensors=output.tensors(self.request)), final))

            def fail(self, error: RequestError) -> None:
                queue.put_nowait((EngineReply(error=error), True))

            def cancelled(self) -> bool:
                return abandoned

        try:
            await core.start()
            if is_stop_request(tensors):
                core.stop(request_id)
                return  # the empty final response carries nothing to yield
            request = parse_request(tensors, parameters, request_id)
            core.submit(request, _Sink(request), parameters.get("fault"))
        except RequestError as exc:
            yield EngineReply(error=exc)
            return
        try:
            while True:
                reply, final = await queue.get()
                yield reply
                if final:
                    return
        finally:
            abandoned = True
