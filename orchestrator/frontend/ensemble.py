"""Talking to Triton's `ensemble` over asyncio gRPC: one bidirectional stream per request.

The stream is built on tritonclient's generated gRPC stub (`service_pb2_grpc`) rather than
`tritonclient.grpc.aio.InferenceServerClient.stream_infer`, because only a raw request can
ask for `triton_enable_empty_final_response`: without it a decoupled model's last response
is not marked, and a client cannot tell the end of a request from a pause.

Every request asks for `stream=true` (text deltas), `exclude_input_in_output`, and the
token counts OpenAI's `usage` reports (`num_input_tokens`, cumulative `num_output_tokens`).
Errors arrive as message text ("in ensemble 'ensemble', INVALID_ARG: ..."): `classify`
turns them into OpenAI errors (400 / 409 / 503 / 500), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from orchestrator.frontend.protocol import Generation, OpenAIError
from orchestrator.wire.errors import ErrorCode

_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
# Triton's own input checks (no code word of ours): the request was wrong.
_TRITON_INPUT_CHECKS = ("missing required input", "unexpected shape", "data-type", "unexpected datatype")
STOP_DRAIN_TIMEOUT_S = 10.0


class TritonError(Exception):
    """An error response from the ensemble, or the server could not be reached."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message, self.unreachable = message, unreachable


def classify(error: TritonError) -> OpenAIError:
    """An ensemble error -> the OpenAI error a client gets (status, type, code)."""
    if error.unreachable:
        return OpenAIError(503, f"the inference server is not reachable: {error.message}", type="server_error",
                           code="service_unavailable")  # fmt: skip
    message = _ENSEMBLE_PREFIX.sub("", error.message.strip()).split("\nTraceback", 1)[0]
    word = message.split(":", 1)[0]
    if word == ErrorCode.INVALID_ARG.value or message.startswith(_TRITON_INPUT_CHECKS):
        return OpenAIError(400, message, code="invalid_value")
    if word == ErrorCode.ALREADY_EXISTS.value:
        return OpenAIError(409, message, param="x-request-id", code="duplicate_request_id")
    if word in (ErrorCode.UNAVAILABLE.value, ErrorCode.CANCELLED.value, ErrorCode.NOT_FOUND.value) or (
        "not ready" in message or "unknown model" in message.lower()
    ):
        code = "overloaded" if "overloaded" in message else "service_unavailable"
        return OpenAIError(503, message, type="server_error", code=code)
    return OpenAIError(500, message.splitlines()[0][:500] if message else "internal error", type="server_error",
                       code="internal_error")  # fmt: skip


@dataclass(frozen=True)
class Reply:
    text: str
    final: bool
    num_input_tokens: int | None
    num_output_tokens: int | None


def _tensor(name: str, arr: np.ndarray) -> tuple[Any, bytes]:
    dtype = "BYTES" if arr.dtype == object else np_to_triton_dtype(arr.dtype)
    tensor = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=dtype, shape=list(arr.shape))
    if arr.dtype == object:
        serialized = serialize_byte_tensor(arr)  # a 0-d array holding the length-prefixed bytes
        return tensor, bytes(serialized.item()) if serialized.size else b""
    return tensor, arr.tobytes()


def _request(model: str, request_id: str, values: dict[str, np.ndarray]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, arr in values.items():
        tensor, raw = _tensor(name, arr)
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def ensemble_values(gen: Generation, prompt: str) -> dict[str, np.ndarray]:
    """The ensemble's inputs for one request, each with its leading batch dim ([1, 1])."""

    def one(value: Any, dtype: Any) -> np.ndarray:
        return np.array([[value]], dtype=dtype)

    values = {
        "text_input": one(prompt.encode(), object),
        "max_tokens": one(gen.max_tokens, np.int32),
        "stream": one(True, bool),
        "exclude_input_in_output": one(True, bool),
        "return_num_input_tokens": one(True, bool),
        "return_num_output_tokens": one(True, bool),
    }
    for name, value in (("temperature", gen.temperature), ("top_p", gen.top_p),
                        ("presence_penalty", gen.presence_penalty), ("frequency_penalty", gen.frequency_penalty)):  # fmt: skip
        if value is not None:
            values[name] = one(value, np.float32)
    if gen.seed is not None:
        values["seed"] = one(gen.seed, np.uint64)
    if gen.stop:
        values["stop_words"] = np.array([[w.encode() for w in gen.stop]], dtype=object)
    return values


def stop_values() -> dict[str, np.ndarray]:
    """A `stop=true` request (README "Ending a request early"): placeholder text and max_tokens."""
    return {
        "text_input": np.array([[b""]], dtype=object),
        "max_tokens": np.array([[1]], dtype=np.int32),
        "stop": np.array([[True]], dtype=bool),
    }


def _reply(message: Any) -> Reply:
    if message.error_message:
        raise TritonError(message.error_message)
    result = InferResult(message.infer_response)
    final = message.infer_response.parameters["triton_final_response"].bool_param

    def count(name: str) -> int | None:
        arr = result.as_numpy(name)
        return None if arr is None or arr.size == 0 else int(arr.reshape(-1)[0])

    text_arr = result.as_numpy("text_output")
    text = "" if text_arr is None else b"".join(bytes(t) for t in text_arr.reshape(-1)).decode("utf-8", "replace")
    return Reply(text, final, count("num_input_tokens"), count("num_output_tokens"))


class RequestStream:
    """One request's bidirectional stream; the request side stays open until `close`."""

    def __init__(self, stub: Any, request: Any) -> None:
        self._closing = asyncio.Event()
        self.finished = False

        async def requests() -> AsyncIterator[Any]:
            yield request
            await self._closing.wait()

        self._call = stub.ModelStreamInfer(requests())

    async def next(self) -> Reply:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise TritonError(exc.details() or str(exc.code()), unreachable=True) from None
        if message is grpc.aio.EOF:
            raise TritonError("the inference server closed the stream", unreachable=True)
        reply = _reply(message)
        self.finished = reply.final
        return reply

    async def replies(self) -> AsyncIterator[Reply]:
        while not self.finished:
            yield await self.next()

    async def drain(self, timeout_s: float = STOP_DRAIN_TIMEOUT_S) -> Reply | None:
        """Read until the final response (after a stop); the last reply, or None."""
        last: list[Reply] = []

        async def read_all() -> None:
            while not self.finished:
                last.append(await self.next())

        with contextlib.suppress(TritonError, asyncio.TimeoutError):
            await asyncio.wait_for(read_all(), timeout_s)
        return last[-1] if last else None

    def close(self) -> None:
        self._closing.set()
        if not self.finished:
            self._call.cancel()


class EnsembleClient:
    """The frontend's link to one tritonserver (its gRPC address) and its ensemble model."""

    def __init__(self, url: str, model: str = "ensemble") -> None:
        self.url, self.model = url, model
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _get_stub(self) -> Any:
        if self._stub is None:  # made inside the running loop (grpc.aio binds to it)
            self._channel = grpc.aio.insecure_channel(self.url)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def open(self, gen: Generation, prompt: str, request_id: str) -> RequestStream:
        return RequestStream(self._get_stub(), _request(self.model, request_id, ensemble_values(gen, prompt)))

    async def stop(self, request_id: str, timeout_s: float = STOP_DRAIN_TIMEOUT_S) -> None:
        """`stop=true` for an in-flight request: the engines free its KV at once."""
        stream = RequestStream(self._get_stub(), _request(self.model, request_id, stop_values()))
        try:
            await stream.drain(timeout_s)
        finally:
            stream.close()

    async def ready(self, timeout_s: float = 2.0) -> bool:
        stub = self._get_stub()
        try:
            server = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
            model = await stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(server.ready and model.ready)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
