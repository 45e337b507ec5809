"""Ending requests early through a real tritonserver, proven from outside: the `disagg_*`
gauges on Triton's metrics endpoint show each engine's KV blocks, leases and requests, and
the orchestrator's in-flight requests and children, back at zero long before the stopped
request could have finished by itself (3000 tokens at >= 6 ms per step is >= 18 s; the
release must come within 10 s)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

import pytest
import requests
import tritonclient.grpc as grpcclient

from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.tools.client import ensemble_inputs, generate, token_inputs
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import held, wait_released

LONG = 3000  # tokens: ~18 s of modelled decode, far longer than the release deadline
RELEASE_S = 10.0
IDS = BuiltinTokenizer().encode("the cat sat on the mat and the dog sat on the log")


@pytest.fixture
def idle(server: TritonServer) -> Iterator[TritonServer]:
    """Each test starts and ends with nothing held (other tests' requests have drained)."""
    assert wait_released(server.metrics_url, RELEASE_S) == {}
    yield server
    assert wait_released(server.metrics_url, RELEASE_S) == {}


def kv_held(server: TritonServer) -> bool:
    return any(key.startswith("disagg_engine_kv_blocks_in_use") for key in held(server.metrics_url))


def wait_until(condition: Any, timeout_s: float = RELEASE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def stop_via_ensemble(server: TritonServer, request_id: str) -> list[Any]:
    """TensorRT-LLM's stop: the same request id with stop=true (placeholder text and max_tokens)."""
    return list(generate(server.grpc_url, "", 1, stream=False, request_id=request_id, stop=True))


@pytest.mark.parametrize("stream", [True, False])
def test_stop_through_the_ensemble_ends_the_request_and_frees_its_kv(idle: TritonServer, stream: bool) -> None:
    server = idle
    rid = f"victim-{stream}"
    victim: list[Any] = []
    thread = threading.Thread(
        target=lambda: victim.extend(
            generate(server.grpc_url, "the cat sat on the mat and the", LONG, stream=stream, request_id=rid)
        )
    )
    thread.start()
    try:
        wait_until(lambda: kv_held(server))  # in its generation phase
        started = time.monotonic()
        ack = stop_via_ensemble(server, rid)
    finally:
        thread.join(60)
    assert len(ack) == 1 and ack[0].final and ack[0].text == ""
    assert victim and victim[-1].final  # it ended with a final response, not an error
    if stream:
        assert victim[-1].text == ""  # the empty final response
    else:
        assert len(victim) == 1 and victim[0].text.startswith("the cat sat")  # prompt + what it had
    assert wait_released(server.metrics_url, RELEASE_S) == {}
    assert time.monotonic() - started < RELEASE_S


def test_stop_over_http_generate_with_the_json_id(idle: TritonServer) -> None:
    """The README's curl: `{"id": ..., "stop": true}` on /generate ends the request with that id."""
    server = idle
    url = f"http://{server.http_url}/v2/models/ensemble/generate"
    victim: dict[str, requests.Response] = {}
    body = {"id": "http-7", "text_input": "the cat sat on the mat", "max_tokens": LONG}
    thread = threading.Thread(target=lambda: victim.update(r=requests.post(url, json=body, timeout=60)))
    thread.start()
    try:
        wait_until(lambda: kv_held(server))
        ack = requests.post(url, json={"id": "http-7", "text_input": "", "max_tokens": 1, "stop": True}, timeout=60)
    finally:
        thread.join(60)
    assert ack.status_code == 200 and ack.json()["text_output"] == ""
    assert victim["r"].status_code == 200 and victim["r"].json()["text_output"].startswith("the cat sat on the mat")
    assert wait_released(server.metrics_url, RELEASE_S) == {}


def test_stop_directly_to_the_orchestrator(idle: TritonServer) -> None:
    server = idle
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            "orchestrator",
            token_inputs(IDS, LONG, streaming=True),
            request_id="direct",
            enable_empty_final_response=True,
        )
        result, error = responses.get(timeout=30)
        assert error is None
        client.async_stream_infer(
            "orchestrator", token_inputs([0], 1, stop=True), request_id="direct", enable_empty_final_response=True
        )
        finals = 0
        while finals < 2:  # the stopped request's final and the stop's own
            result, error = responses.get(timeout=30)
            assert error is None, error
            finals += result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
        client.close()
    assert wait_released(server.metrics_url, RELEASE_S) == {}


def test_triton_cancellation_of_an_orchestrator_request_frees_its_kv(idle: TritonServer) -> None:
    """A gRPC client cancels its stream: Triton marks the request cancelled, the orchestrator
    notices (cancel_check_ms) and stops its children on the engines."""
    server = idle
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("orchestrator", token_inputs(IDS, LONG, streaming=True), request_id="cancelme")
    result, error = responses.get(timeout=30)
    assert error is None
    wait_until(lambda: kv_held(server))
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_released(server.metrics_url, RELEASE_S) == {}


def test_ensemble_inputs_accept_stop() -> None:
    """The client helper sends stop as a BOOL [1, 1] tensor, as TensorRT-LLM clients do."""
    (stop,) = [i for i in ensemble_inputs("", 1, stop=True) if i.name() == "stop"]
    assert stop.datatype() == "BOOL" and stop.shape() == [1, 1]
