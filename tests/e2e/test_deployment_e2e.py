"""A repository generated from a deployment file loads in a real tritonserver and serves:
the aggregated baseline (`deployments/aggregated.yaml`, no context pool) answers through
the same ensemble with the same text as the committed disaggregated repository, and every
request ran whole on a generation-pool engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import requests
import tritonclient.grpc as grpcclient

from orchestrator.ops.access import ADMIN_KEY_ENV, KV_SECRET_ENV
from orchestrator.ops.deployment import load, parse
from orchestrator.ops.k8s_manifests import manifests
from orchestrator.tools.client import generate
from orchestrator.tools.deploy import build, deployment_secrets
from orchestrator.tools.launch import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"deployment {i}: a quick brown fox jumps over the lazy dog " * (1 + i % 2) for i in range(6)]


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    out = tmp_path_factory.mktemp("aggregated")
    repos = build(load(ROOT / "deployments" / "aggregated.yaml"), out)
    secrets = deployment_secrets(out)  # what its launch script would use
    with TritonServer(
        model_repository=repos["main"], kv_secret=secrets[KV_SECRET_ENV], admin_key=secrets[ADMIN_KEY_ENV]
    ) as srv:
        yield srv


def _successes(server: TritonServer, model: str) -> int:
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model_name=model, as_json=True)
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats["model_stats"])


def test_generated_models_are_all_ready(aggregated: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(aggregated.grpc_url)
    index = client.get_model_repository_index(headers=aggregated.admin_headers("grpc"), as_json=True)  # a locked API
    names = {m["name"] for m in index["models"]}
    assert names == {
        "ensemble",
        "preprocessing",
        "orchestrator",
        "postprocessing",
        *(f"generation_{i}" for i in range(4)),
    }
    assert all(client.is_model_ready(n) for n in names)


def test_aggregated_deployment_serves_the_same_text(aggregated: TritonServer, server: TritonServer) -> None:
    for prompt in PROMPTS:
        streamed = "".join(d.text for d in generate(aggregated.grpc_url, prompt, 10, stream=True))
        expected = "".join(d.text for d in generate(server.grpc_url, prompt, 10, stream=True))
        assert streamed == expected and streamed
    body = {"text_input": PROMPTS[0], "max_tokens": 10, "exclude_input_in_output": True}
    reply = requests.post(f"http://{aggregated.http_url}/v2/models/ensemble/generate", json=body, timeout=60)
    assert reply.status_code == 200
    assert reply.json()["text_output"] == "".join(
        d.text for d in generate(server.grpc_url, PROMPTS[0], 10, stream=True)
    )
    engine_requests = sum(_successes(aggregated, f"generation_{i}") for i in range(4))
    assert engine_requests == len(PROMPTS) + 1  # one whole (aggregated) request per client request
    used = [i for i in range(4) if _successes(aggregated, f"generation_{i}")]
    assert len(used) > 1, "least_loaded spreads requests over the pool"


def test_the_frontend_liveness_probe_is_a_real_request(aggregated: TritonServer) -> None:
    """The Kubernetes liveness command of the frontend passes against a serving server and
    fails against one that does not answer (Triton's own /v2/health/live would not see a
    dead python stub)."""
    deployment = load(ROOT / "deployments" / "aggregated.yaml")
    for port, expected in ((aggregated.http_port, 0), (1, 1)):
        moved = replace(deployment, servers=(replace(deployment.servers[0], http_port=port),))
        (frontend,) = [m for m in manifests(moved, "") if m["kind"] == "Deployment"]
        command = frontend["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"]
        assert command[0] == "python3"
        done = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30)
        assert (done.returncode != 0) == bool(expected), done.stderr[-300:]


def test_the_generated_launch_script_starts_a_serving_server(tmp_path: Path) -> None:
    """`OUT/launch-main.sh` as a user runs it: here (no tritonserver on PATH) it goes through
    scripts/serve; the server serves the generated repository, and SIGTERM stops it."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    deployment = parse({
        "servers": {"main": {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}},
        "pools": {"context": {"engines": 1}, "generation": {"engines": 1}},
    })  # fmt: skip
    build(deployment, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITONSERVER"}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if not (Path(p) / "tritonserver").exists())
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "launch-main.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            time.sleep(0.2)
        assert client.is_server_ready(), (tmp_path / "server.log").read_text()[-2000:]
        text = "".join(d.text for d in generate(f"127.0.0.1:{grpc}", PROMPTS[0], 5, stream=True))
        assert text
        # its admin APIs are locked with the build's key (secrets.env), which the launcher wrote beside the script
        key = deployment_secrets(tmp_path)[ADMIN_KEY_ENV]
        assert (tmp_path / "admin-key").read_text().strip() == key
        index = f"http://127.0.0.1:{http}/v2/repository/index"
        assert requests.post(index, json={}, timeout=30).status_code == 403
        assert requests.post(index, json={}, headers={"admin-key": key}, timeout=30).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        log.close()
