"""Bounded load against a real tritonserver: floods are refused at once, not queued.

The orchestrator runs with `max_in_flight` = 4 over engines whose decode steps take
STEP_MS, so an admitted request lasts at least its tokens x STEP_MS (the engines sleep
out their modelled time). Every flood goes out on ONE gRPC stream, which delivers the
server's responses in the order it sent them: "every refusal came before the first
admitted request finished" is then a fact about that order, not about wall-clock time.
`aggregated_0` runs one sequence at a time and lets two wait (`max_queued_requests`).
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from orchestrator.text.detokenize import completion_text
from orchestrator.tools.client import ensemble_inputs, generate, token_inputs
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import samples, total, wait_released
from orchestrator.tools.overhead import ZERO_COST
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive
from orchestrator.tools.soak_checks import process_rss_mib
from tests.pipeline_harness import PROMPTS, TOK, client_tensors, oracle, prompt_ids

MAX_IN_FLIGHT = 4
STEP_MS = 25  # per decode step: an admitted request of ADMITTED_TOKENS lasts >= 5 s
ADMITTED_TOKENS = 200
LONG = 4000  # tokens: >= 100 s, so only a stop ends these
AGG_QUEUE = 2  # aggregated_0's max_queued_requests
OVERLOADED = re.compile(
    rf"UNAVAILABLE: overloaded: this orchestrator instance already serves {MAX_IN_FLIGHT} requests \(max_in_flight={MAX_IN_FLIGHT}\); retry later"
)
RSS_GROWTH_MIB = 16.0  # orchestrator stub, after a flood of 800 vs after one of 200 (600 more refusals)
NO_END = {"end_id": -1}  # no end token: every admitted request runs its whole max_tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("load_repository")
    engine = {**ZERO_COST, "decode_ms_per_step": str(STEP_MS)}
    models = {m: ModelSpec(m) for m in FRONTEND_MODELS}
    models["orchestrator"] = ModelSpec("orchestrator", {"max_in_flight": str(MAX_IN_FLIGHT), "log_requests": "true"})
    models.update({m: ModelSpec(m, engine) for m in ("context_0", "context_1", "generation_0", "generation_1")})
    one_at_a_time = {**engine, "max_batch_size": "1", "max_queued_requests": str(AGG_QUEUE)}
    models["aggregated_0"] = ModelSpec("aggregated_0", one_at_a_time)
    derive(repo, models)
    with TritonServer(model_repository=repo) as srv:
        yield srv


@dataclass(frozen=True)
class Event:
    kind: str  # delta | final | error
    request_id: str  # "" for an error: a gRPC stream's error carries only its message
    text: str = ""
    message: str = ""


class Stream:
    """Requests on one gRPC stream; every response and error in the order it arrived."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: list[Event] = []
        self._changed = threading.Condition()
        self.client.start_stream(callback=self._arrived)

    def _arrived(self, result: Any, error: Any) -> None:
        if error is not None:
            event = Event("error", "", message=error.message())
        else:
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            body = "" if text is None else b"".join(text.reshape(-1)).decode("utf-8")
            event = Event("final" if final else "delta", response.id, text=body)
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def send(self, model: str, inputs: list[grpcclient.InferInput], rid: str) -> None:
        self.client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=True)

    def wait(self, ready: Callable[[list[Event]], bool], timeout_s: float) -> list[Event]:
        """The events once `ready(events)` (bounded: the caller's assertions judge what came)."""
        with self._changed:
            self._changed.wait_for(lambda: ready(self.events), timeout_s)
            return list(self.events)

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def ended(events: list[Event]) -> int:
    return sum(e.kind in ("final", "error") for e in events)


def reference(prompt: str, max_tokens: int) -> str:
    tensors = client_tensors(
        prompt, max_tokens, streaming=False, exclude=True, extra={"end_id": np.array([[-1]], dtype=np.int32)}
    )
    return completion_text(TOK, prompt_ids(tensors), asyncio.run(oracle(tensors)))


def counted(before: list, after: list, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def orchestrator_rss_mib(server: TritonServer) -> float:
    assert server.process is not None
    return process_rss_mib(server.process.pid)["orchestrator"]


def test_a_flood_past_max_in_flight_is_refused_at_once_and_the_admitted_finish_exactly(server: TritonServer) -> None:
    """64 streaming requests at once: 4 are admitted and stream their exact text, 60 get
    `UNAVAILABLE: overloaded` (max_in_flight=4), every refusal before the first admitted
    request finished; the metrics count exactly the 60, the request log says so, nothing is held."""
    flood = 64
    prompts = {f"a{i}": f"{PROMPTS['ascii']} {i}" for i in range(flood)}
    before = samples(server.metrics_url)
    stream = Stream(server.grpc_url)
    try:
        for rid, prompt in prompts.items():
            stream.send("ensemble", ensemble_inputs(prompt, ADMITTED_TOKENS, stream=True, **NO_END), rid)
        events = stream.wait(lambda ev: ended(ev) >= flood, 120)
    finally:
        stream.close()
    errors = [i for i, e in enumerate(events) if e.kind == "error"]
    finals = [i for i, e in enumerate(events) if e.kind == "final"]
    assert len(errors) + len(finals) == flood, f"{len(errors)} refused + {len(finals)} finished of {flood}"
    admitted = [events[i].request_id for i in finals]
    assert sorted(admitted) == sorted(set(admitted)) and len(admitted) == MAX_IN_FLIGHT, admitted
    wrong = [events[i].message for i in errors if not OVERLOADED.search(events[i].message)]
    assert wrong == []
    assert errors[-1] < finals[0], "a refusal came after an admitted request had finished"
    for rid in admitted:
        text = "".join(e.text for e in events if e.request_id == rid)
        assert text == reference(prompts[rid], ADMITTED_TOKENS), rid

    assert wait_released(server.metrics_url, 30) == {}
    after = samples(server.metrics_url)  # a released gauge means the counters were flushed (gauges.py)
    refused = len(errors)
    assert counted(before, after, "disagg_orchestrator_rejected_total", reason="overloaded") == refused
    assert counted(before, after, "disagg_requests_total", outcome="overloaded") == refused
    assert counted(before, after, "disagg_requests_total", outcome="ok") == MAX_IN_FLIGHT
    assert counted(before, after, "disagg_engine_rejected_total") == 0  # the engines never saw the flood
    assert "outcome=overloaded" in server.log_text()


def flood_with_long_admitted(server: TritonServer, tag: str, flood: int) -> tuple[int, int]:
    """`flood` LONG streaming requests: wait for the 4 admitted ones to stream and every other
    one to be refused; then stop the 4 (a stop=true at the limit is never refused) and wait
    until everything ended and nothing is held. Returns (refused, stopped)."""
    stream = Stream(server.grpc_url)
    try:
        for i in range(flood):
            stream.send(
                "ensemble", ensemble_inputs(f"{PROMPTS['ascii']} {i}", LONG, stream=True, **NO_END), f"{tag}{i}"
            )

        def settled(ev: list[Event]) -> bool:
            streaming = {e.request_id for e in ev if e.kind == "delta"}
            return len(streaming) >= MAX_IN_FLIGHT and sum(e.kind == "error" for e in ev) >= flood - MAX_IN_FLIGHT

        events = stream.wait(settled, 300)
        admitted = sorted({e.request_id for e in events if e.kind == "delta"})
        refusals = [e for e in events if e.kind == "error"]
        assert len(admitted) == MAX_IN_FLIGHT and len(refusals) == flood - MAX_IN_FLIGHT, (admitted, len(refusals))
        assert all(OVERLOADED.search(e.message) for e in refusals)
        assert not any(e.kind == "final" for e in events), "an admitted LONG request ended before its stop"
        for rid in admitted:
            (ack,) = generate(server.grpc_url, "", 1, stream=False, request_id=rid, stop=True)
            assert ack.final and ack.text == ""
        events = stream.wait(lambda ev: ended(ev) >= flood, 60)
    finally:
        stream.close()
    finals = [e for e in events if e.kind == "final"]
    assert sorted(e.request_id for e in finals) == admitted and all(e.text == "" for e in finals)
    assert wait_released(server.metrics_url, 30) == {}
    return len(refusals), len(finals)


def test_floods_of_200_then_800_cost_the_orchestrator_no_memory(server: TritonServer) -> None:
    """Two floods whose 4 admitted requests run until stopped: all others are refused, and the
    orchestrator stub's RSS after the flood of 800 is within RSS_GROWTH_MIB of that after 200
    (a refusal that kept anything would grow it with the flood size)."""
    before = samples(server.metrics_url)
    assert flood_with_long_admitted(server, "f200-", 200) == (196, MAX_IN_FLIGHT)
    rss_200 = orchestrator_rss_mib(server)
    assert flood_with_long_admitted(server, "f800-", 800) == (796, MAX_IN_FLIGHT)
    rss_800 = orchestrator_rss_mib(server)
    assert rss_800 - rss_200 <= RSS_GROWTH_MIB, f"orchestrator RSS {rss_200:.1f} -> {rss_800:.1f} MiB"
    after = samples(server.metrics_url)  # released after each flood: its counters are flushed
    assert counted(before, after, "disagg_orchestrator_rejected_total", reason="overloaded") == 992
    assert counted(before, after, "disagg_requests_total", outcome="stopped") == 2 * MAX_IN_FLIGHT
    assert counted(before, after, "disagg_orchestrator_stops_total", where="here", found="true") == 2 * MAX_IN_FLIGHT


def test_an_engine_refuses_past_max_queued_requests_and_serves_its_queue(server: TritonServer) -> None:
    """aggregated_0 runs one sequence and lets AGG_QUEUE wait: with one running, of four more
    the last two are refused at once (UNAVAILABLE overloaded, counted); the two queued run
    once the running one is stopped."""
    ids = list(TOK.encode(PROMPTS["ascii"]))
    before = samples(server.metrics_url)
    stream = Stream(server.grpc_url)
    try:
        stream.send("aggregated_0", token_inputs(ids, LONG, streaming=True), "run")
        stream.wait(lambda ev: any(e.request_id == "run" for e in ev), 60)  # running, not waiting
        for rid in ("q1", "q2", "x1", "x2"):
            stream.send("aggregated_0", token_inputs(ids, 4, streaming=True), rid)
        events = stream.wait(lambda ev: sum(e.kind == "error" for e in ev) >= 2, 60)
        refusals = [e.message for e in events if e.kind == "error"]
        assert len(refusals) == 2 and not any(e.kind == "final" for e in events), events
        for message in refusals:
            assert message.startswith(
                f"UNAVAILABLE: overloaded: engine 'aggregated_0' has {AGG_QUEUE} requests waiting"
            ), message
            assert f"max_queued_requests={AGG_QUEUE}" in message
        stream.send("aggregated_0", token_inputs(ids, 1, stop=True), "run")  # ends the running one
        events = stream.wait(lambda ev: ended(ev) >= 6, 60)  # 2 refusals, run + its stop's ack, q1, q2
    finally:
        stream.close()
    finals = sorted(e.request_id for e in events if e.kind == "final")
    assert finals == ["q1", "q2", "run", "run"], events
    for rid in ("q1", "q2"):
        assert sum(e.request_id == rid and e.kind == "delta" for e in events) >= 1  # they did generate
    assert wait_released(server.metrics_url, 30) == {}
    after = samples(server.metrics_url)
    assert counted(before, after, "disagg_engine_rejected_total", engine="aggregated_0", reason="overloaded") == 2
