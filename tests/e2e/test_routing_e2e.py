"""Routing through a real tritonserver: KV-aware reuse seen in the perf outputs, conditional
disaggregation, a failing engine skipped then recovered, an unloaded engine, an engine added
while serving. The server runs a derived repository (orchestrator/tools/repository.py) with a pool
file and Triton's explicit model control; what each engine served is read from Triton's
own statistics, so the orchestrator is judged from outside."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import tritonclient.grpc as grpcclient

from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.repository import ModelSpec, derive, write_model

ENGINES = ("context_0", "context_1", "generation_0", "generation_1")
ORCHESTRATOR = {
    "pool_file": "pools.json",
    "context_policy": "kv_aware",
    "generation_policy": "kv_aware",
    "local_prefill_max_tokens": "16",
    "breaker_backoff_s": "0.2",
    "breaker_backoff_max_s": "0.4",
    "health_check_s": "0.1",
    "pool_poll_s": "0.1",
    "log_routing": "true",
    "log_requests": "true",
}
PREFIX = "You are a careful assistant. Answer briefly and cite the manual section by number. " * 4


class Deployment:
    def __init__(self, server: TritonServer, repo: Path) -> None:
        self.server, self.repo = server, repo
        self.admin = grpcclient.InferenceServerClient(server.grpc_url)
        self.key = server.admin_headers("grpc")  # the repository API is locked (orchestrator/ops/access.py)

    def served(self, model: str) -> int:
        """Requests the model finished, by Triton's statistics (0 when it is not loaded)."""
        try:
            stats = self.admin.get_inference_statistics(model_name=model, as_json=True)
        except Exception:
            return 0
        return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats["model_stats"])

    def counts(self) -> dict[str, int]:
        return {m: self.served(m) for m in (*ENGINES, "context_2")}

    def pools(self, context: list[str], generation: list[str] = ["generation_0", "generation_1"]) -> None:  # noqa: B006
        tmp = self.repo / "orchestrator" / "pools.json.tmp"
        tmp.write_text(json.dumps({"context_engines": context, "generation_engines": generation}))
        tmp.replace(self.repo / "orchestrator" / "pools.json")  # atomic: never half a file

    def ask(self, prompt: str, max_tokens: int = 4, **extra: object) -> dict:
        deltas = list(generate(self.server.grpc_url, prompt, max_tokens, stream=True, timeout_s=30, **extra))
        assert deltas and deltas[-1].final
        return {"text": "".join(d.text for d in deltas), "outputs": deltas[-1].outputs, "deltas": deltas}

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.server.log_text().splitlines() if needle in line]


def until(condition: Callable[[], bool], action: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Repeat `action` until `condition` holds, bounded (background effects: probes, file polls)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        action()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    repo = tmp_path_factory.mktemp("routing_repository")
    models = {m: ModelSpec(m) for m in ("ensemble", "preprocessing", "postprocessing", *ENGINES)}
    models["orchestrator"] = ModelSpec("orchestrator", ORCHESTRATOR)
    derive(repo, models)
    (repo / "orchestrator" / "pools.json").write_text(
        json.dumps(
            {"context_engines": ["context_0", "context_1"], "generation_engines": ["generation_0", "generation_1"]}
        )
    )
    with TritonServer(model_repository=repo, extra_args=["--model-control-mode=explicit", "--load-model=*"]) as server:
        yield Deployment(server, repo)


def test_kv_aware_sends_a_shared_prefix_to_one_engine_and_it_reuses_the_blocks(deployment: Deployment) -> None:
    reused = []
    for i in range(4):
        result = deployment.ask(PREFIX + f"Question {i}: what is step {i}?", return_perf_metrics=True)
        reused.append(int(result["outputs"]["kv_cache_reused_blocks"].reshape(-1)[0]))
    assert reused[0] == 0 and all(r > 0 for r in reused[1:]), reused
    # Every decision is logged; the generation engine holding the prefix got all four (and,
    # with the prefix cached there, the uncached rest is short: the context hop is skipped).
    lines = deployment.log_lines("phase=generation")[-4:]
    engines = {line.split("engine=")[1].split()[0] for line in lines}
    assert len(lines) == 4 and len(engines) == 1 and "policy=kv_aware" in lines[0], lines
    assert all("matched_blocks=0/" not in line for line in lines[1:]), lines


def test_short_prompt_skips_the_context_hop(deployment: Deployment) -> None:
    before = deployment.counts()
    result = deployment.ask("hi", max_tokens=6)
    after = deployment.counts()
    assert result["text"]
    assert after["context_0"] + after["context_1"] == before["context_0"] + before["context_1"]
    assert after["generation_0"] + after["generation_1"] == before["generation_0"] + before["generation_1"] + 1


def test_each_finished_request_logs_one_line_with_its_engines_and_times(deployment: Deployment) -> None:
    deltas = list(
        generate(deployment.server.grpc_url, PREFIX + "Which section?", 5, stream=True, request_id="logged-7")
    )
    assert deltas[-1].final
    until(lambda: bool(deployment.log_lines("request id=logged-7 ")), lambda: time.sleep(0.05), timeout_s=10)
    (line,) = deployment.log_lines("request id=logged-7 ")
    fields = dict(
        part.split("=", 1) for part in line.rstrip().rstrip('"').split("request ", 1)[1].split()
    )  # Triton quotes it
    assert fields["outcome"] == "ok" and fields["streaming"] == "true" and fields["output_tokens"] == "5"
    assert fields["generation"].startswith("generation_") and float(fields["e2e_ms"]) >= float(fields["ttft_ms"])


def test_failing_engine_is_skipped_and_comes_back_when_fixed(deployment: Deployment) -> None:
    faulty = {"fault": "fail"}
    write_model(deployment.repo, "context_1", ModelSpec("context_1", faulty))
    deployment.admin.load_model("context_1", headers=deployment.key)  # reloads it from the changed config
    try:
        before = deployment.counts()
        for i in range(20):  # ask() raises on any error response: every request succeeds
            assert deployment.ask(f"variant {i}: a question on topic {i}. " * 8)["deltas"][-1].final
        failures = deployment.log_lines("on engine context_1 failed (UNAVAILABLE)")
        assert 1 <= len(failures) <= 10, len(failures)  # skipped while its breaker is open
        assert deployment.counts()["context_0"] - before["context_0"] == 20
    finally:
        write_model(deployment.repo, "context_1", ModelSpec("context_1"))
        deployment.admin.load_model("context_1", headers=deployment.key)
    served = deployment.served("context_1")
    until(lambda: deployment.served("context_1") > served, lambda: deployment.ask(f"after {time.monotonic()} " * 12))


def test_unloaded_engine_is_skipped_and_used_again_once_loaded(deployment: Deployment) -> None:
    deployment.admin.unload_model("generation_1", headers=deployment.key)
    try:
        for i in range(6):
            assert deployment.ask(f"unloaded {i} " * 12, max_tokens=5)["text"]
    finally:
        deployment.admin.load_model("generation_1", headers=deployment.key)
    served = deployment.served("generation_1")
    until(lambda: deployment.served("generation_1") > served, lambda: deployment.ask(f"back {time.monotonic()} " * 12))


def test_engine_added_while_serving_receives_traffic(deployment: Deployment) -> None:
    write_model(deployment.repo, "context_2", ModelSpec("context_1"))
    deployment.admin.load_model("context_2", headers=deployment.key)
    deployment.pools(["context_0", "context_1", "context_2"])
    until(lambda: deployment.served("context_2") > 0, lambda: deployment.ask(f"fresh prompt {time.monotonic()} " * 4))
    deployment.pools(["context_0", "context_1"])
    deployment.admin.unload_model("context_2", headers=deployment.key)
    for i in range(4):  # requests after the removal never fail
        assert deployment.ask(f"after removal {i} " * 6)["text"]
