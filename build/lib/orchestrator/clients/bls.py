"""`EngineClient` over Triton BLS, for use inside the python backend.

Triton 2.51's decoupled BLS gives a *blocking* `ResponseIterator` (no `__aiter__`, no
`cancel()`). Pulling it on the event loop would stall every other request, so each child
stream gets a reader thread that sends the child request (`exec`, which blocks until the
engine took it) and then only calls `next()`, handing responses to the loop with
`call_soon_threadsafe`; all `send`s stay on the loop thread (a thread that calls a response
sender crashed the stub in trials). `async_exec` is not used: it runs the same `exec` on
the loop's small default executor (six threads on two cores) through a callback that
python_backend later fixed for a use-after-free.

A finished iterator is handed to a `StubFence` (orchestrator/runtime/stub_fence.py) instead of
being dropped: the stub frees its own reference later on a thread without the GIL, and that
must never be the last one.

Abandoning a stream early (the caller closes the generator) cancels the child request
where the iterator has `cancel()` (newer Tritons); 2.51's has none, so the orchestrator
also sends the engine a `stop=true` request for that child id, and the reader thread ends
when the engine's final response arrives.

`pb_utils` is passed in, so this module imports without Triton.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from typing import Any, AsyncGenerator, Mapping

import numpy as np

from orchestrator.clients.engine_client import EngineReply
from orchestrator.runtime.stub_fence import StubFence
from orchestrator.wire.contract import coalesce
from orchestrator.wire.errors import ErrorCode, RequestError

_END = object()


class _Refused(Exception):
    """exec() raised: the engine never took the request."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def triton_error_code(pb_utils: Any, error: Any) -> ErrorCode:
    """Map a pb_utils.TritonError's numeric code back to our ErrorCode by name."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    for name in ErrorCode.__members__:
        if code is not None and getattr(pb_utils.TritonError, name, object()) == code:
            return ErrorCode[name]
    return ErrorCode.INTERNAL


class BlsEngineClient:
    def __init__(self, pb_utils: Any, requested_outputs: tuple[str, ...], fence: StubFence | None = None) -> None:
        self.pb = pb_utils
        self.requested_outputs = list(requested_outputs)
        self.fence = fence if fence is not None else StubFence()
        self.coalesced = 0  # token replies joined into an earlier one (the loop was behind)

    async def is_ready(self, engine: str) -> bool:
        """Triton's own readiness of the engine model (False while unloaded or loading)."""
        return bool(self.pb.is_model_ready(model_name=engine))

    def _reply(self, response: Any) -> EngineReply | None:
        if response.has_error():
            err = response.error()
            code = triton_error_code(self.pb, err)
            message = err.message()
            word, sep, rest = message.partition(": ")
            if sep and word in ErrorCode.__members__:
                # Our engines prefix the code, and through BLS that prefix is what survives:
                # Triton 2.51 hands a BLS caller a generic code (found by the soak: a lost
                # lease's NOT_FOUND arrived as INTERNAL, so the context phase never re-ran).
                code, message = ErrorCode[word], rest
            return EngineReply(error=RequestError(message, code))
        outputs = response.output_tensors()
        if not outputs:
            return None  # a flags-only final response carries nothing to forward
        return EngineReply(tensors={t.name(): t.as_numpy() for t in outputs})

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=engine,
            inputs=[pb.Tensor(name, value) for name, value in tensors.items()],
            requested_output_names=self.requested_outputs,
            request_id=request_id,
            parameters=json.loads(json.dumps(dict(parameters))),
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        started: list[Any] = []  # the iterator, once exec() returned (for cancel())
        threading.Thread(
            target=self._read, args=(request, loop, queue, started), name=f"bls-{engine}-{request_id}", daemon=True
        ).start()
        finished = False
        try:
            async for reply in self._replies(engine, queue):
                yield reply
            finished = True
        finally:
            cancel = getattr(started[0], "cancel", None) if started else None
            if not finished and cancel is not None:
                cancel()  # real child cancellation, where this Triton has it

    def _read(
        self, request: Any, loop: asyncio.AbstractEventLoop, queue: "asyncio.Queue[Any]", started: list[Any]
    ) -> None:
        """On the stream's own thread: send the child request, then hand every response to the loop."""

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the model is being unloaded, nobody reads
                pass

        try:
            responses = request.exec(decoupled=True)
        except Exception as exc:
            put(_Refused(exc))
            put(_END)
            return
        started.append(responses)
        try:
            for response in responses:
                put(response)
        except Exception as exc:
            put(exc)
        finally:
            self.fence.retire(responses)  # its cleanup is queued: the stub lets go of it later
            del responses
            put(_END)

    async def _replies(self, engine: str, queue: "asyncio.Queue[Any]") -> AsyncGenerator[EngineReply, None]:
        pending: deque[Any] = deque()  # taken from the queue while coalescing, not yet handled
        while True:
            item = pending.popleft() if pending else await queue.get()
            if item is _END:
                return
            if isinstance(item, _Refused):
                message = f"engine '{engine}' could not take the request: {item.cause}"
                yield EngineReply(error=RequestError(message, ErrorCode.UNAVAILABLE))
                continue
            if isinstance(item, Exception):
                yield EngineReply(error=RequestError(f"engine '{engine}' stream failed: {item}", ErrorCode.UNAVAILABLE))
                continue
            reply = self._reply(item)
            if reply is None:
                continue
            if reply.tensors is not None and not queue.empty():
                reply = self._coalesce(reply, queue, pending)
            yield reply

    def _coalesce(self, first: EngineReply, queue: "asyncio.Queue[Any]", pending: "deque[Any]") -> EngineReply:
        """Join the token replies already waiting behind `first` (the loop fell behind the
        engine) into one; the first waiting item that is not one goes to `pending`."""
        parts = [first.tensors]
        while not queue.empty():
            item = queue.get_nowait()
            reply = None if item is _END or isinstance(item, Exception) else self._reply(item)
            if reply is not None and reply.tensors is not None:
                parts.append(reply.tensors)
            elif reply is None and item is not _END and not isinstance(item, Exception):
                continue  # a flags-only response: nothing to forward
            else:
                pending.append(item)
                break
        if len(parts) == 1:
            return first
        self.coalesced += len(parts) - 1
        return EngineReply(tensors=coalesce(parts))  # type: ignore[arg-type]
