"""`EngineClient` over gRPC: engine models served by *another* tritonserver.

An engine is named by an endpoint, `grpc://HOST:PORT/MODEL`, so a deployment can put its
context and generation pools on different hosts. One `tritonclient.grpc.aio` client (one
HTTP/2 channel) per `HOST:PORT` is shared by every child stream to that server.

Each child request gets its own bidirectional `ModelStreamInfer` call: write the request,
half-close, read replies until the final one, wait for the server to close the stream.
The request protobuf is built here (tritonclient's `_get_inference_request`) and sent on
the client's `_client_stub`, both private to tritonclient (pinned in requirements.txt),
instead of going through the public `stream_infer`, because:

- A final response that carries no tensors (a model that sends its data, then a separate
  flags-only `COMPLETE_FINAL`) is dropped by Triton's gRPC frontend unless the request
  asks for `triton_enable_empty_final_response`, and `stream_infer` has no such argument
  and rejects `triton_*` parameter names. Measured on Triton 2.51: without the flag,
  responses that carry data or a model's error do have `triton_final_response`, but
  after a flags-only final the stream goes quiet (or closes, once half-closed), so a clean
  end cannot be told from a cut one. With the flag every request ends with a response
  whose `triton_final_response` is true; an empty one is not forwarded (as in `bls.py`).
  Only errors from Triton's frontend (unknown model, wrong inputs) lack the parameter:
  the request never started, and the server closes the stream.
- The call object gives `cancel()`, which cancels the request on the remote server too
  (its engine sees `is_cancelled()`), and `read()`, which needs no wrapper iterator.

Errors. `stream` never raises: a failure is exactly one error reply, then the end.
Our engines prefix their messages with the code (`UNAVAILABLE: ...`, see
`triton_io.triton_error`), because a gRPC stream carries only the text; the prefix is
mapped back to `ErrorCode` and stripped. Anything else from the remote side (connection
refused, server gone, unknown model, a stream that ends without a final response, a
`close()` while streaming) is `UNAVAILABLE` naming the endpoint; a request that cannot
even be encoded here (unsupported dtype or parameter type, reserved `triton_*` parameter,
malformed endpoint) is `INTERNAL`, a bug of the caller.

Cancellation. Closing the reply iterator (`aclose()`, or task cancellation while it waits)
cancels the gRPC call, which cancels the remote Triton request. A consumer that `break`s
out of `async for` should wrap the iterator in `contextlib.aclosing`: otherwise the
generator (and the cancel) waits for garbage collection.

gRPC aio channels belong to the event loop that created them: use one `GrpcEngineClient`
per loop and `await close()` it before the loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncGenerator, Mapping

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request  # the protobuf stream_infer sends

from orchestrator.clients.endpoints import RemoteEndpoint
from orchestrator.clients.engine_client import EngineReply
from orchestrator.wire.errors import ErrorCode, RequestError

# gRPC retries a failed connection with exponential backoff up to 120 s by default; an
# engine server that restarts would then look down for up to two minutes after it is
# back. Cap it so `is_ready` and new streams see a restarted engine within a few seconds.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),  # tritonclient's defaults
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_FINAL = "triton_final_response"
_CLOSE_TIMEOUT_S = 2.0  # for the server to close a stream after its final response
_ASK_FOR_FINAL = "triton_enable_empty_final_response"


def _remote_error(endpoint: RemoteEndpoint, message: str) -> RequestError:
    """Our engines' `CODE: text` back to (code, text); any other message is the server's."""
    code_name, sep, rest = message.partition(": ")
    if sep and code_name in ErrorCode.__members__:
        return RequestError(rest, ErrorCode[code_name])
    return RequestError(f"engine {endpoint} failed: {message}", ErrorCode.UNAVAILABLE)


def _unavailable(endpoint: RemoteEndpoint, what: str) -> EngineReply:
    return EngineReply(error=RequestError(f"engine {endpoint} is unavailable: {what}", ErrorCode.UNAVAILABLE))


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (as opposed to only its gRPC call)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0  # before 3.11 we cannot tell: assume so


def _reply_tensors(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    result = grpcclient.InferResult(response)  # decodes raw contents, BYTES included
    return {output.name: result.as_numpy(output.name) for output in response.outputs}


class GrpcEngineClient:
    """Streams child requests to engine models on other tritonservers."""

    def __init__(self, requested_outputs: tuple[str, ...] = (), ready_timeout_s: float = 2.0) -> None:
        # No requested outputs: Triton returns every output the engine produces.
        self.requested_outputs = tuple(requested_outputs)
        self.ready_timeout_s = ready_timeout_s
        self._clients: dict[str, grpcaio.InferenceServerClient] = {}

    def _client(self, endpoint: RemoteEndpoint) -> grpcaio.InferenceServerClient:
        client = self._clients.get(endpoint.url)
        if client is None:
            client = grpcaio.InferenceServerClient(endpoint.url, channel_args=_CHANNEL_ARGS)
            self._clients[endpoint.url] = client
        return client

    async def close(self) -> None:
        """Close every channel; streams still open on them end with UNAVAILABLE."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    def _request(
        self,
        endpoint: RemoteEndpoint,
        tensors: Mapping[str, np.ndarray],
        parameters: Mapping[str, Any],
        request_id: str,
    ) -> service_pb2.ModelInferRequest:
        inputs = []
        for name, value in tensors.items():
            array = np.asarray(value)
            dtype = grpcclient.np_to_triton_dtype(array.dtype)
            if dtype is None:
                raise ValueError(f"input '{name}' has dtype {array.dtype}, which Triton cannot carry")
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        request = _get_inference_request(
            model_name=endpoint.model,
            inputs=inputs,
            model_version="",
            request_id=request_id,
            outputs=[grpcclient.InferRequestedOutput(name) for name in self.requested_outputs] or None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=json.loads(json.dumps(dict(parameters))),  # str enums -> str, as bls.py sends them
        )
        request.parameters[_ASK_FOR_FINAL].bool_param = True  # a reserved name: set past the client's check
        return request

    async def stream(
        self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[EngineReply, None]:
        try:
            endpoint = RemoteEndpoint.parse(engine)
            request = self._request(endpoint, tensors, parameters, request_id)
        except Exception as exc:
            error = RequestError(f"cannot send a request to engine '{engine}': {exc}", ErrorCode.INTERNAL)
            yield EngineReply(error=error)
            return
        call: Any = None
        try:
            call = self._client(endpoint)._client_stub.ModelStreamInfer()
            await call.write(request)
            await call.done_writing()  # one request per stream: the server closes it after the final response
            final = False
            while not final:
                message = await call.read()
                if message is grpc.aio.EOF:
                    status = await call.code()
                    yield _unavailable(endpoint, f"the stream closed ({status.name}) before the final response")
                    return
                response = message.infer_response
                if _FINAL in response.parameters:
                    final = response.parameters[_FINAL].bool_param
                else:  # only Triton's own errors (unknown model, bad inputs) lack it: nothing started
                    final = bool(message.error_message)
                if message.error_message:
                    yield EngineReply(error=_remote_error(endpoint, message.error_message))
                    break  # one error ends the replies; a request still running is cancelled below
                if response.outputs:
                    yield EngineReply(tensors=_reply_tensors(response))
            if final:
                # The server closes the stream right after the final response; waiting for
                # that (no extra round trip) means no call outlives this generator.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(call.code(), _CLOSE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            yield _unavailable(endpoint, f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            # grpc.aio raises CancelledError from read() when the call itself was cancelled
            # underneath us (close() while streaming), not our task: a failure like any other.
            yield _unavailable(endpoint, "the call was cancelled locally (client closed)")
        except Exception as exc:
            yield _unavailable(endpoint, f"{type(exc).__name__}: {exc}")
        finally:
            # The consumer went away (aclose, task cancelled), the stream failed, or an error
            # came before the final response: cancelling the call cancels the remote request.
            if call is not None and not call.done():
                call.cancel()

    async def is_ready(self, engine: str) -> bool:
        """Whether the endpoint's server answers that the model is ready, within `ready_timeout_s`.

        False on any failure (server down, unknown model, timeout); a malformed endpoint is a
        configuration bug and raises ValueError.
        """
        endpoint = RemoteEndpoint.parse(engine)
        client = self._client(endpoint)
        try:
            ready = await asyncio.wait_for(
                client.is_model_ready(endpoint.model, client_timeout=self.ready_timeout_s), self.ready_timeout_s
            )
        except Exception:
            return False
        return bool(ready)
