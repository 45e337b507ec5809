"""Request migration through a real tritonserver and the client-facing ensemble.

The server runs a derived repository (orchestrator/tools/repository.py) whose generation engines both
crash mid-stream (the stub's injected fault `crash`): generation_0 after 3 generated
tokens, generation_1 after 5. Whichever engine a streaming request meets first, 8 tokens
take exactly one migration (3 + 5 or 5 + 3) and 12 tokens need a second one. A copy of the
ensemble (`ensemble_nomig`) runs through an orchestrator with `max_migrations: 0`. The
undisturbed reference is the same stub engine run in-process, undisturbed (the aggregated
oracle of tests/pipeline_harness.py), decoded with the same built-in tokenizer.

The orchestrators reach the engines over loopback gRPC, except `orchestrator_bls` (behind
`ensemble_bls`), which reaches them over BLS: there Triton 2.51 does not deliver an
engine's error response that follows streamed responses (python_backend r24.10 leaves
such a response's id unset), so a mid-stream crash shows as silence, and
`next_reply_timeout_s` (1 s here) is what notices it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Iterator

import pytest
from tritonclient.utils import InferenceServerException

from orchestrator.text.detokenize import completion_text
from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import samples, samples_until, total, wait_released
from orchestrator.tools.repository import ModelSpec, derive, set_parameters, write_model
from tests.pipeline_harness import PROMPTS, TOK, client_tensors, oracle, prompt_ids

CRASHES = {
    "generation_0": {"fault": "crash", "fault_after_tokens": "3", "fault_phase": "generation"},
    "generation_1": {"fault": "crash", "fault_after_tokens": "5", "fault_phase": "generation"},
}
ONE_MIGRATION = 8  # 3 + 5 tokens, in either order
MIGRATIONS = "disagg_orchestrator_migrations_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("migration_repository")
    models = {
        m: ModelSpec(m)
        for m in ("ensemble", "preprocessing", "postprocessing", "orchestrator", "context_0", "context_1")
    }
    models.update({name: ModelSpec(name, params) for name, params in CRASHES.items()})
    models["orchestrator_nomig"] = ModelSpec("orchestrator", {"max_migrations": "0"})
    models["orchestrator_bls"] = ModelSpec("orchestrator", {"next_reply_timeout_s": "1"})
    derive(repo, models)
    for ensemble, orchestrator in (("ensemble_nomig", "orchestrator_nomig"), ("ensemble_bls", "orchestrator_bls")):
        config = write_model(repo, ensemble, ModelSpec("ensemble")) / "config.pbtxt"
        text = config.read_text()
        assert text.count('model_name: "orchestrator"') == 1
        config.write_text(text.replace('model_name: "orchestrator"', f'model_name: "{orchestrator}"'))
    srv = TritonServer(model_repository=Path(repo))  # its ports are chosen now
    url = f"grpc://127.0.0.1:{srv.grpc_port}"
    pools = {
        "context_engines": f"{url}/context_0,{url}/context_1",
        "generation_engines": f"{url}/generation_0,{url}/generation_1",
    }
    for orchestrator in ("orchestrator", "orchestrator_nomig"):
        config = repo / orchestrator / "config.pbtxt"
        config.write_text(set_parameters(config.read_text(), pools))
    with srv:
        yield srv


def reference(prompt: str, max_tokens: int) -> str:
    """The completion of an undisturbed run: the same stub engine, in-process, nothing injected."""
    tensors = client_tensors(prompt, max_tokens, streaming=False, exclude=True)
    return completion_text(TOK, prompt_ids(tensors), asyncio.run(oracle(tensors)))


def stream(server: TritonServer, prompt: str, max_tokens: int, model: str = "ensemble") -> tuple[list[str], str]:
    """The streamed deltas and, if the request failed, its error message ("" when it succeeded)."""
    deltas: list[str] = []
    try:
        for delta in generate(server.grpc_url, prompt, max_tokens, stream=True, model=model, timeout_s=30):
            deltas.append(delta.text)
    except InferenceServerException as exc:
        return deltas, exc.message()
    return deltas, ""


def settled(server: TritonServer, ready: Callable[[list], bool], timeout_s: float = 10.0) -> list:
    return samples_until(server.metrics_url, ready, timeout_s)


@pytest.mark.parametrize("prompt", [PROMPTS["ascii"], PROMPTS["emoji"]], ids=["ascii", "emoji"])
def test_a_stream_that_loses_its_engine_mid_stream_equals_an_undisturbed_run(server: TritonServer, prompt: str) -> None:
    before = samples(server.metrics_url)
    deltas, error = stream(server, prompt, ONE_MIGRATION)
    assert error == ""
    assert "".join(deltas).encode() == reference(prompt, ONE_MIGRATION).encode()
    assert len(deltas) > 3  # it did stream before and after the crash

    def migrated(s: list) -> float:
        return total(s, MIGRATIONS, outcome="ok") - total(before, MIGRATIONS, outcome="ok")

    after = settled(server, lambda s: migrated(s) >= 1)
    assert migrated(after) == 1
    assert total(after, MIGRATIONS) - total(before, MIGRATIONS) == 1
    assert wait_released(server.metrics_url, 10) == {}


def test_non_streaming_requests_are_retried_from_the_start_and_stay_exact(server: TritonServer) -> None:
    """Nothing reached a non-streaming client before the crash: a plain retry, no migration."""
    before = samples(server.metrics_url)
    completion = reference(PROMPTS["cjk"], 5)
    for exclude in (True, False):
        (only,) = list(generate(server.grpc_url, PROMPTS["cjk"], 5, stream=False, exclude_input_in_output=exclude))
        assert only.final and only.text.encode() == (completion if exclude else PROMPTS["cjk"] + completion).encode()

    def ended(s: list) -> float:  # a request's migrations are counted in the same flush as its end
        return total(s, "disagg_requests_total", streaming="false") - total(
            before, "disagg_requests_total", streaming="false"
        )

    after = settled(server, lambda s: ended(s) >= 2)
    assert ended(after) == 2 and total(after, MIGRATIONS) == total(before, MIGRATIONS)
    assert wait_released(server.metrics_url, 10) == {}


def test_spent_budget_ends_unavailable_saying_a_migration_was_tried(server: TritonServer) -> None:
    before = samples(server.metrics_url)
    deltas, error = stream(server, PROMPTS["ascii"], 12)
    assert "UNAVAILABLE" in error and "crashed mid-stream" in error
    assert "(after tokens were streamed: migrated 1 time, from grpc://" in error and "max_migrations=1 spent)" in error
    assert reference(PROMPTS["ascii"], 12).startswith("".join(deltas)) and deltas

    def failed(s: list) -> float:
        return total(s, MIGRATIONS, outcome="unavailable") - total(before, MIGRATIONS, outcome="unavailable")

    assert failed(settled(server, lambda s: failed(s) >= 1)) == 1
    assert wait_released(server.metrics_url, 10) == {}


def test_max_migrations_zero_keeps_the_old_unavailable(server: TritonServer) -> None:
    deltas, error = stream(server, PROMPTS["ascii"], ONE_MIGRATION, model="ensemble_nomig")
    assert "UNAVAILABLE" in error and error.endswith(
        "crashed mid-stream (injected fault) (after tokens were streamed: not retried)"
    )
    assert reference(PROMPTS["ascii"], ONE_MIGRATION).startswith("".join(deltas)) and deltas
    assert wait_released(server.metrics_url, 10) == {}


def test_over_bls_a_lost_mid_stream_error_still_migrates_and_stays_exact(server: TritonServer) -> None:
    """Over BLS the engine's error never arrives: the silence past next_reply_timeout_s is the failure."""
    before = samples(server.metrics_url)
    deltas, error = stream(server, PROMPTS["ascii"], ONE_MIGRATION, model="ensemble_bls")
    assert error == ""
    assert "".join(deltas).encode() == reference(PROMPTS["ascii"], ONE_MIGRATION).encode()

    def migrated(s: list) -> float:
        return total(s, MIGRATIONS, outcome="ok") - total(before, MIGRATIONS, outcome="ok")

    assert migrated(settled(server, lambda s: migrated(s) >= 1)) == 1
    assert wait_released(server.metrics_url, 10) == {}
