"""Which transport a child request takes (orchestrator/clients/dispatch.py): a stream of many
responses never goes over BLS when the server's own gRPC endpoint is known; the server's
address is read from a real process's command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any, AsyncGenerator, Mapping

import numpy as np
import pytest

from orchestrator.clients.dispatch import EndpointClient, answers_once
from orchestrator.clients.engine_client import EngineReply
from orchestrator.runtime.self_endpoint import grpc_address_from_argv, loopback_address, server_grpc_address
from orchestrator.wire.contract import stop_tensors


class _Recorder:
    """An EngineClient that records which engine names reached it."""

    def __init__(self) -> None:
        self.engines: list[str] = []

    async def stream(self, engine: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any],
                     request_id: str) -> AsyncGenerator[EngineReply, None]:  # fmt: skip
        self.engines.append(engine)
        yield EngineReply(tensors={})

    async def is_ready(self, engine: str) -> bool:
        self.engines.append(f"ready? {engine}")
        return True


STREAMING = {"input_ids": np.zeros((1, 3), np.int32), "streaming": np.ones((1, 1), bool)}
NOT_STREAMING = {"input_ids": np.zeros((1, 3), np.int32), "streaming": np.zeros((1, 1), bool)}


@pytest.mark.parametrize(
    ("tensors", "parameters", "once"),
    [
        (STREAMING, {"request_type": "context_only"}, True),
        (STREAMING, {"request_type": "generation_only"}, False),
        (STREAMING, {}, False),  # both phases on one engine, streamed
        (NOT_STREAMING, {"request_type": "generation_only"}, True),
        (stop_tensors(), {}, True),
    ],
)
def test_only_context_phases_non_streaming_requests_and_stops_answer_once(
    tensors: dict, parameters: dict, once: bool
) -> None:
    assert answers_once(tensors, parameters) is once


def _route(client: EndpointClient, engine: str, tensors: dict, parameters: dict) -> None:
    async def drain() -> None:
        async for _ in client.stream(engine, tensors, parameters, "r:x"):
            pass

    asyncio.run(drain())


def test_local_streams_of_many_responses_go_over_loopback_grpc_and_the_rest_over_bls() -> None:
    local, remote = _Recorder(), _Recorder()
    client = EndpointClient(local, remote_factory=lambda: remote, loopback="127.0.0.1:8101")
    _route(client, "generation_0", STREAMING, {"request_type": "generation_only"})
    _route(client, "context_0", STREAMING, {"request_type": "context_only"})
    _route(client, "generation_0", stop_tensors(), {})
    _route(client, "generation_1", NOT_STREAMING, {"request_type": "generation_only"})
    _route(client, "grpc://10.0.0.9:8001/generation_2", STREAMING, {"request_type": "generation_only"})
    assert remote.engines == ["grpc://127.0.0.1:8101/generation_0", "grpc://10.0.0.9:8001/generation_2"]
    assert local.engines == ["context_0", "generation_0", "generation_1"]


def test_without_loopback_every_local_request_uses_bls() -> None:
    local, remote = _Recorder(), _Recorder()
    client = EndpointClient(local, remote_factory=lambda: remote)
    _route(client, "generation_0", STREAMING, {"request_type": "generation_only"})
    assert local.engines == ["generation_0"] and remote.engines == []


def test_readiness_probes_of_local_engines_go_over_loopback_grpc_when_there_is_one() -> None:
    """A BLS is_model_ready in flight while the server shuts down aborts Triton 2.51."""
    local, remote = _Recorder(), _Recorder()
    client = EndpointClient(local, remote_factory=lambda: remote, loopback="127.0.0.1:8101")
    asyncio.run(client.is_ready("context_0"))
    asyncio.run(client.is_ready("grpc://10.0.0.9:8001/generation_2"))
    assert remote.engines == ["ready? grpc://127.0.0.1:8101/context_0", "ready? grpc://10.0.0.9:8001/generation_2"]
    bls_only, unused = _Recorder(), _Recorder()
    asyncio.run(EndpointClient(bls_only, remote_factory=lambda: unused).is_ready("context_0"))
    assert bls_only.engines == ["ready? context_0"] and unused.engines == []


@pytest.mark.parametrize(
    ("argv", "address"),
    [
        (["tritonserver", "--model-repository=m"], "127.0.0.1:8001"),
        (["tritonserver", "--grpc-port=8101", "--grpc-address=0.0.0.0"], "127.0.0.1:8101"),
        (["tritonserver", "--grpc-port", "9001", "--grpc-address", "10.1.2.3"], "10.1.2.3:9001"),
        (["tritonserver", "--grpc-address=::1", "--grpc-port=9002"], "[::1]:9002"),
    ],
)
def test_the_servers_grpc_address_comes_from_its_flags(argv: list[str], address: str) -> None:
    assert grpc_address_from_argv(argv) == address


def test_a_server_without_grpc_needs_the_address_set_or_bls() -> None:
    with pytest.raises(ValueError, match="--allow-grpc=false"):
        grpc_address_from_argv(["tritonserver", "--allow-grpc=false"])
    assert loopback_address("bls", "") == ""
    assert loopback_address("grpc", "127.0.0.1:7001") == "127.0.0.1:7001"


def test_the_address_is_read_from_a_real_process() -> None:
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--grpc-port=18123"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # exec'd: /proc shows its own argv
        assert server_grpc_address(proc.pid) == "127.0.0.1:18123"
    finally:
        proc.communicate(b"")
