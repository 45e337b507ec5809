"""pb_utils <-> plain data, shared by every `model.py` adapter.

`pb_utils` is passed in (it only exists inside the python backend stub), so the rest of
the library never imports Triton.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from orchestrator.errors import RequestError


def model_parameters(args: Mapping[str, Any]) -> dict[str, str]:
    """The model config's `parameters` block as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def request_tensors(request: Any) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def triton_error(pb_utils: Any, error: RequestError) -> Any:
    """The code travels twice: as Triton's code (HTTP status) and as the message's prefix,
    because a gRPC stream carries only the message text to the client."""
    code = getattr(pb_utils.TritonError, error.code.value, pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(f"{error.code.value}: {error.message}", code)


def response(pb_utils: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


def error_response(pb_utils: Any, error: RequestError) -> Any:
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, error))


class SenderSink:
    """A Triton request's response sender seen as a `ResponseSink`: tensors in, one final flag
    at the end; `cancelled()` asks Triton whether the client cancelled the request."""

    __slots__ = ("pb", "sender", "request")

    def __init__(self, pb_utils: Any, request: Any) -> None:
        self.pb = pb_utils
        self.request = request
        self.sender = request.get_response_sender()

    def cancelled(self) -> bool:
        return bool(self.request.is_cancelled())

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(response(self.pb, tensors), flags=flags)

    def fail(self, error: RequestError) -> None:
        self.sender.send(error_response(self.pb, error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
