"""Two orchestrator instances and two postprocessing instances in one real tritonserver.

Each instance is a process of its own and Triton hands a request to any of them: a
`stop=true` must reach the request wherever it runs (orchestrator/serving/siblings.py), and a
stream's deltas must reach the client in order although two postprocessing processes
render them (postprocessing's `preserve_ordering`). Leak gauges, one per orchestrator
instance, must all return to zero.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.text.detokenize import completion_text
from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import held, samples, samples_until, total, wait_released
from orchestrator.tools.overhead import ZERO_COST
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive, set_instance_count
from tests.pipeline_harness import PROMPTS, TOK, client_tensors, oracle, prompt_ids

INSTANCES = 2
LONG = 3000  # tokens: at SLOW_STEP_MS a step, longer than the stop test can wait, so only a stop ends it
SLOW_STEP_MS = 20
STOPS = "disagg_orchestrator_stops_total"


def two_instance_server(repo: Path, engine: dict[str, str]) -> TritonServer:
    engines = {m: ModelSpec(m, engine) for m in ("context_0", "context_1", "generation_0", "generation_1")}
    derive(repo, {**{m: ModelSpec(m) for m in FRONTEND_MODELS}, **engines})
    for model in ("orchestrator", "postprocessing"):
        config = repo / model / "config.pbtxt"
        config.write_text(set_instance_count(config.read_text(), INSTANCES))
    return TritonServer(model_repository=repo)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Free engines: a stream's deltas come back to back, the hardest case for ordering."""
    with two_instance_server(tmp_path_factory.mktemp("instances_repository"), ZERO_COST) as srv:
        yield srv


@pytest.fixture
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Engines that take SLOW_STEP_MS per decode step: a LONG stream cannot end on its own
    while the stop test runs (free engines finish 8 of them in about 4 s, a race with the stops)."""
    engine = {**ZERO_COST, "decode_ms_per_step": str(SLOW_STEP_MS)}
    with two_instance_server(tmp_path_factory.mktemp("slow_instances_repository"), engine) as srv:
        yield srv


def reference(prompt: str, max_tokens: int) -> str:
    tensors = client_tensors(prompt, max_tokens, streaming=False, exclude=True)
    return completion_text(TOK, prompt_ids(tensors), asyncio.run(oracle(tensors)))


def instance_gauges(server: TritonServer) -> dict[str, float]:
    """disagg_orchestrator_in_flight_requests per instance label."""
    return {
        labels.get("instance", ""): value
        for name, labels, value in samples(server.metrics_url, "disagg_orchestrator_in_flight_requests")
    }


def test_every_orchestrator_instance_publishes_its_own_gauges(server: TritonServer) -> None:
    assert sorted(instance_gauges(server)) == [f"orchestrator_0_{i}" for i in range(INSTANCES)]


def test_streams_stay_in_order_and_exact_through_two_postprocessing_instances(server: TritonServer) -> None:
    """64 streams at once, many deltas each: any delta handed over out of order would change
    the concatenated text of its stream."""
    prompts = [f"{PROMPTS[kind]} {i}" for i in range(16) for kind in ("ascii", "emoji", "cjk", "multibyte")][:64]
    max_tokens = 48

    def run(prompt: str) -> tuple[str, int]:
        deltas = [d.text for d in generate(server.grpc_url, prompt, max_tokens, stream=True, timeout_s=120)]
        return "".join(deltas), len(deltas)

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(run, prompts))
    expected = [reference(p, max_tokens) for p in prompts]
    wrong = [p for p, (text, _), want in zip(prompts, results, expected) if text.encode() != want.encode()]
    assert wrong == []
    # Every stream has pieces to keep in order: its first token leaves alone (the context
    # phase's), later ones as the engines produce them (merged when the sender is behind).
    assert all(n >= 2 for _, n in results)
    assert wait_released(server.metrics_url, 10) == {}


def test_a_stop_reaches_its_request_on_whichever_instance_runs_it(slow_server: TritonServer) -> None:
    """Eight long streams spread over the instances; each one's stop=true lands on any
    instance: every stream ends with its empty final response, and some stops had to be
    forwarded to the sibling that held the request."""
    before = samples(slow_server.metrics_url)
    victims = [f"victim-{i}" for i in range(8)]
    finals: dict[str, Any] = {}

    def victim(rid: str) -> None:
        finals[rid] = list(
            generate(slow_server.grpc_url, "the cat sat on the mat and the", LONG, stream=True, request_id=rid)
        )[-1]

    threads = [threading.Thread(target=victim, args=(rid,)) for rid in victims]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(instance_gauges(slow_server).values()) < len(victims):
        assert time.monotonic() < deadline, instance_gauges(slow_server)
        time.sleep(0.05)
    spread = instance_gauges(slow_server)
    for rid in victims:
        (ack,) = generate(slow_server.grpc_url, "", 1, stream=False, request_id=rid, stop=True)
        assert ack.final and ack.text == ""
    for thread in threads:
        thread.join(30)
    assert all(finals[rid].final and finals[rid].text == "" for rid in victims), finals

    def counted(s: list, **labels: str) -> float:
        return total(s, STOPS, **labels) - total(before, STOPS, **labels)

    after = samples_until(slow_server.metrics_url, lambda s: counted(s, found="true") >= len(victims))
    assert counted(after, found="true") == len(victims)  # each stop ended its request exactly once
    if min(spread.values()) > 0:  # requests ran on both instances: not every stop found its own
        assert counted(after, where="from_sibling", found="true") >= 1, (spread, after)
    assert counted(after, where="forwarded") == counted(after, where="from_sibling")
    assert wait_released(slow_server.metrics_url, 10) == {}
    assert held(slow_server.metrics_url) == {}
