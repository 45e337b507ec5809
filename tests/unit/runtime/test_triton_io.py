"""triton_io: a response carries only the outputs its request asked for (Triton 2.51's python
backend frees the others without the GIL), and what is sent stays referenced until send()
has returned. Checked against a stand-in for pb_utils, which exists only inside the stub."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from orchestrator.runtime import triton_io as io


class _Pb:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name: str, value: np.ndarray) -> None:
            self.name, self.value = name, value

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any]) -> None:
            self.output_tensors = tuple(output_tensors)  # the real one copies them too


class _Request:
    def __init__(self, requested: set[str]) -> None:
        self.requested = requested
        self.sender = _Sender()

    def requested_output_names(self) -> set[str]:
        return set(self.requested)

    def get_response_sender(self) -> "_Sender":
        return self.sender

    def is_cancelled(self) -> bool:
        return False


class _Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[list[str], int, int]] = []

    def send(self, response: Any, flags: int = 0) -> None:
        # Each tensor's references inside send(): the response's, this loop's, getrefcount's
        # argument, and the caller's own list; without that last one, Triton's release inside
        # send would be the last reference.
        refs = min(sys.getrefcount(tensor) for tensor in response.output_tensors)
        self.sent.append(([t.name for t in response.output_tensors], flags, refs))


TENSORS = {
    name: np.zeros((1, 1), np.int32) for name in ("output_ids", "sequence_length", "detok_window", "num_output_tokens")
}


def test_a_sink_sends_only_what_its_request_asked_for() -> None:
    request = _Request({"detok_window", "num_output_tokens", "cum_log_probs"})
    sink = io.SenderSink(_Pb, request)
    sink.send(TENSORS, final=False)
    sink.send(TENSORS, final=True)
    (names, flags, refs), (_, final_flags, _) = request.sender.sent
    assert names == ["detok_window", "num_output_tokens"] and (flags, final_flags) == (0, 1)
    assert refs >= 4


def test_responses_returned_from_execute_are_filtered_too() -> None:
    reply = io.response(_Pb, TENSORS, io.requested_outputs(_Request({"output_ids"})))
    assert [t.name for t in reply.output_tensors] == ["output_ids"]
