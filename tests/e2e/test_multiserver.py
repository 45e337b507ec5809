"""The three-server deployment on loopback: context engines, generation engines and the
frontend (ensemble + orchestrator) on separate tritonserver processes, talking gRPC; the KV
cache moves between the engine servers' processes. Built from `deployments/three-server.yaml`
by `orchestrator/tools/deploy.py`, as the README tells users to (only the ports are made free ones)."""

from __future__ import annotations

import concurrent.futures
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from orchestrator.ops.access import KV_SECRET_ENV
from orchestrator.ops.deployment import parse
from orchestrator.tools.client import generate
from orchestrator.tools.deploy import deployment_secrets, on_free_ports, serve
from orchestrator.tools.launch import TritonServer

THREE_SERVER_FILE = Path(__file__).resolve().parents[2] / "deployments" / "three-server.yaml"

PROMPTS = [f"request {i}: the cat sat on the mat and then the dog came by " * (1 + i % 3) for i in range(8)]


class ThreeServers:
    def __init__(self, context: TritonServer, generation: TritonServer, frontend: TritonServer, out: Path) -> None:
        self.context, self.generation, self.frontend = context, generation, frontend
        self.out = out  # the build's folder

    def text(self, server: TritonServer, prompt: str, max_tokens: int = 12) -> str:
        return "".join(d.text for d in generate(server.grpc_url, prompt, max_tokens, stream=True, timeout_s=60))

    @staticmethod
    def served(server: TritonServer, *models: str) -> int:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        total = 0
        for model in models:
            stats = client.get_inference_statistics(model_name=model, as_json=True)
            total += sum(
                int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats["model_stats"]
            )
        return total


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeServers]:
    data = yaml.safe_load(THREE_SERVER_FILE.read_text())
    data["orchestrator"]["settings"] = {"log_routing": True}
    with ExitStack() as stack:
        out = tmp_path_factory.mktemp("three_servers")
        servers = serve(on_free_ports(parse(data)), out, stack)
        yield ThreeServers(servers["context"], servers["generation"], servers["frontend"], out)


def test_every_server_has_the_builds_secrets(three: ThreeServers) -> None:
    """KV moves between the engine servers: their stub engines must share the KV secret."""
    servers = (three.context, three.generation, three.frontend)
    assert len({s.kv_secret for s in servers}) == 1 and len({s.admin_key for s in servers}) == 1
    assert three.context.kv_secret == deployment_secrets(three.out)[KV_SECRET_ENV]


def test_each_server_holds_only_its_part(three: ThreeServers) -> None:
    frontend = grpcclient.InferenceServerClient(three.frontend.grpc_url)
    assert frontend.is_model_ready("orchestrator") and not frontend.is_model_ready("context_0")
    assert grpcclient.InferenceServerClient(three.context.grpc_url).is_model_ready("context_1")
    assert not grpcclient.InferenceServerClient(three.context.grpc_url).is_model_ready("generation_0")


def test_streams_through_three_servers_match_the_single_server(three: ThreeServers, server: TritonServer) -> None:
    """Concurrent streams through the frontend; each completion equals the one-server deployment's."""
    before = (
        three.served(three.context, "context_0", "context_1"),
        three.served(three.generation, "generation_0", "generation_1"),
    )
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        remote = list(pool.map(lambda p: three.text(three.frontend, p), PROMPTS))
    local = [three.text(server, p) for p in PROMPTS]
    assert remote == local and all(remote)
    after = (
        three.served(three.context, "context_0", "context_1"),
        three.served(three.generation, "generation_0", "generation_1"),
    )
    assert after[0] - before[0] == len(PROMPTS) and after[1] - before[1] == len(PROMPTS)
    routed = [line for line in three.frontend.log_text().splitlines() if "engine=grpc://127.0.0.1:" in line]
    assert len(routed) >= 2 * len(PROMPTS)


def test_a_dead_engine_server_is_a_clean_unavailable_error(three: ThreeServers) -> None:
    """Last in this module: the generation server goes away; a request ends with one typed error."""
    three.generation.stop()
    with pytest.raises(InferenceServerException) as info:
        three.text(three.frontend, PROMPTS[0])
    assert "UNAVAILABLE" in str(info.value) and "generation" in str(info.value)
