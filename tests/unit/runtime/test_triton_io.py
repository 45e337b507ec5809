"""triton_io: a response carries only the outputs its request asked for (Triton 2.51's python
backend frees the others without the GIL), and what is sent stays referenced until send()
has returned. Checked against tests/fake_pb_utils.py, a stand-in for pb_utils, which exists
only inside the stub."""

from __future__ import annotations

import numpy as np

from orchestrator.runtime import triton_io as io
from tests.fake_pb_utils import FakePbUtils, InferenceRequest

TENSORS = {
    name: np.zeros((1, 1), np.int32) for name in ("output_ids", "sequence_length", "detok_window", "num_output_tokens")
}


def _request(pb: FakePbUtils, requested: set[str]) -> InferenceRequest:
    return pb.InferenceRequest(model_name="postprocessing", requested_output_names=sorted(requested))


def test_a_sink_sends_only_what_its_request_asked_for() -> None:
    pb = FakePbUtils()
    request = _request(pb, {"detok_window", "num_output_tokens", "cum_log_probs"})
    sink = io.SenderSink(pb, request)
    sink.send(TENSORS, final=False)
    sink.send(TENSORS, final=True)
    first, final = request.get_response_sender().sent
    assert first.names == ["detok_window", "num_output_tokens"] and (first.flags, final.flags) == (0, 1)
    # Each tensor's references inside send(): the response's, the fake's counting loop's,
    # getrefcount's argument, and the caller's own list; without that last one, Triton's
    # release inside send would be the last reference.
    assert first.refs is not None and first.refs >= 4


def test_responses_returned_from_execute_are_filtered_too() -> None:
    pb = FakePbUtils()
    reply = io.response(pb, TENSORS, io.requested_outputs(_request(pb, {"output_ids"})))
    assert [t.name() for t in reply.output_tensors()] == ["output_ids"]
