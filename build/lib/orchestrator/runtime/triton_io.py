"""pb_utils <-> plain data, shared by every `model.py` adapter.

`pb_utils` is passed in (it only exists inside the python backend stub), so the rest of
the library never imports Triton.

Every response goes out through `respond` (decoupled models) or `response` (models that
return from execute) with the outputs its request asked for and no others. Triton 2.51's
python backend (r24.10) drops the outputs a request did not ask for inside
`ResponseSender::send`, after releasing the GIL; the dropped tensors' numpy arrays are then
freed with no GIL while our other threads run Python, which corrupted the stub's heap under
load (`malloc_consolidate(): unaligned fastbin chunk`, silent stalls). Upstream fixed the
destructor in later releases; here nothing is left for it to drop. `respond` also keeps the
tensors and the response referenced from Python until `send()` has returned, so whatever
the backend releases is never the last reference.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from orchestrator.runtime.stub_fence import StubFence
from orchestrator.wire.errors import RequestError


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


def requested_outputs(request: Any) -> frozenset[str]:
    """The output names the caller of `request` asked for (the ensemble's output_map, a BLS
    caller's `requested_output_names`, a client's outputs; all outputs when it named none)."""
    return frozenset(request.requested_output_names())


def response(pb_utils: Any, tensors: Mapping[str, np.ndarray], requested: frozenset[str]) -> Any:
    """A response with the `requested` outputs of `tensors` only (see the module docstring)."""
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items() if k in requested]
    )


def respond(
    pb_utils: Any, sender: Any, tensors: Mapping[str, np.ndarray], requested: frozenset[str], flags: int
) -> None:
    """Send the `requested` outputs of `tensors` on a decoupled response sender."""
    outputs = [pb_utils.Tensor(k, v) for k, v in tensors.items() if k in requested]
    reply = pb_utils.InferenceResponse(output_tensors=outputs)
    sender.send(reply, flags=flags)
    # `outputs` and `reply` are released only now, with the GIL held, after send() returned.
    del reply, outputs


def error_response(pb_utils: Any, error: RequestError) -> Any:
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, error))


class SenderSink:
    """A Triton request's response sender seen as a `ResponseSink`: tensors in, one final flag
    at the end; `cancelled()` asks Triton whether the client cancelled the request.

    With a `fence`, each `cancelled()` round trip also lets the fence release what it holds
    (orchestrator/runtime/stub_fence.py says why that needs such a round trip)."""

    __slots__ = ("pb", "sender", "request", "requested", "fence")

    def __init__(self, pb_utils: Any, request: Any, fence: StubFence | None = None) -> None:
        self.pb = pb_utils
        self.request = request
        self.sender = request.get_response_sender()
        self.requested = requested_outputs(request)
        self.fence = fence

    def cancelled(self) -> bool:
        if self.fence is None:
            return bool(self.request.is_cancelled())
        return bool(self.fence.cross(self.request.is_cancelled))

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        respond(self.pb, self.sender, tensors, self.requested, flags)

    def fail(self, error: RequestError) -> None:
        self.sender.send(error_response(self.pb, error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
