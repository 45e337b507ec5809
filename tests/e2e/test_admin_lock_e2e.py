"""Triton's admin APIs are locked on every server TritonServer starts (orchestrator/ops/access.py).

Against a real tritonserver under explicit model control, on a one-model repository: the
model-repository, model-config, shared-memory, trace and logging APIs refuse a call without
the admin key or with a wrong one, over HTTP and gRPC, and serve it with the key; health,
metadata, statistics and inference stay open. The model reports the environment its stub
got: the KV secret arrives, the admin key does not. A server given restricted-API flags of
its own starts (ours give way) and takes their header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from orchestrator.tools.launch import TritonServer

REFUSED_HTTP = {"error": "This API is restricted, expecting header 'admin-key'"}
REFUSED_GRPC = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
WRONG = {"admin-key": "not-the-key-0123456789"}
WRONG_GRPC = {"triton-grpc-protocol-admin-key": "not-the-key-0123456789"}

CONFIG = """
name: "env"
backend: "python"
max_batch_size: 0
input [ { name: "name" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "value" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

# Answers the value of the environment variable it is asked for, as its stub sees it.
MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            name = pb_utils.get_input_tensor_by_name(request, "name").as_numpy()[0].decode()
            value = os.environ.get(name, "<unset>").encode()
            output = pb_utils.Tensor("value", np.array([value], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse([output]))
        return responses
"""


def _repository(root: Path) -> Path:
    (root / "env" / "1").mkdir(parents=True)
    (root / "env" / "config.pbtxt").write_text(CONFIG)
    (root / "env" / "1" / "model.py").write_text(MODEL)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = _repository(tmp_path_factory.mktemp("admin_lock_repository"))
    with TritonServer(model_repository=repo, extra_args=["--model-control-mode=explicit", "--load-model=*"]) as srv:
        yield srv


def _http(
    server: TritonServer, method: str, path: str, headers: dict[str, str] | None = None, body: object = None
) -> requests.Response:
    return requests.request(method, f"http://{server.http_url}{path}", headers=headers, json=body, timeout=60)


def _ready(server: TritonServer) -> bool:
    return _http(server, "GET", "/v2/models/env/ready").status_code == 200


def _env_value(server: TritonServer, name: str) -> str:
    """Inference over HTTP, without any key."""
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("name", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([name.encode()], dtype=np.object_))
    return client.infer("env", [tensor]).as_numpy("value")[0].decode()


def test_http_unload_needs_the_key(server: TritonServer) -> None:
    for headers in (None, WRONG):
        refused = _http(server, "POST", "/v2/repository/models/env/unload", headers, {})
        assert (refused.status_code, refused.json()) == (403, REFUSED_HTTP)
        assert _ready(server)
    done = _http(server, "POST", "/v2/repository/models/env/unload", server.admin_headers(), {})
    assert done.status_code == 200, done.text
    assert not _ready(server)
    assert _http(server, "POST", "/v2/repository/models/env/load", None, {}).status_code == 403
    loaded = _http(server, "POST", "/v2/repository/models/env/load", server.admin_headers(), {})
    assert loaded.status_code == 200, loaded.text
    assert _ready(server)


def test_grpc_unload_needs_the_key(server: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for headers in (None, WRONG_GRPC, server.admin_headers("http")):  # the HTTP header name is not enough
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("env", headers=headers)
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and refused.value.message() == REFUSED_GRPC
        assert client.is_model_ready("env")
    client.unload_model("env", headers=server.admin_headers("grpc"))
    assert not client.is_model_ready("env")
    client.load_model("env", headers=server.admin_headers("grpc"))
    assert client.is_model_ready("env")


def test_shared_memory_registration_needs_the_key(server: TritonServer) -> None:
    """A client that could register a /dev/shm region could read or write the engines' KV stores."""
    region = {"key": "/triton_kv_store", "offset": 0, "byte_size": 4096}
    for headers in (None, WRONG):
        refused = _http(server, "POST", "/v2/systemsharedmemory/region/kv/register", headers, region)
        assert (refused.status_code, refused.json()) == (403, REFUSED_HTTP)
        assert _http(server, "GET", "/v2/systemsharedmemory/status", headers).status_code == 403
    with pytest.raises(InferenceServerException, match="expecting header 'triton-grpc-protocol-admin-key'"):
        grpcclient.InferenceServerClient(server.grpc_url).register_system_shared_memory("kv", "/triton_kv_store", 4096)
    status = _http(server, "GET", "/v2/systemsharedmemory/status", server.admin_headers())
    assert (status.status_code, status.json()) == (200, [])  # the key opens it; nothing was registered


@pytest.mark.parametrize(
    "method, path, body",
    [("GET", "/v2/models/env/config", None), ("GET", "/v2/trace/setting", None), ("GET", "/v2/logging", None),
     ("POST", "/v2/logging", {"log_verbose_level": 1}), ("POST", "/v2/repository/index", {})],
)  # fmt: skip
def test_config_trace_logging_and_index_need_the_key(
    server: TritonServer, method: str, path: str, body: object
) -> None:
    refused = _http(server, method, path, None, body)
    assert (refused.status_code, refused.json()) == (403, REFUSED_HTTP)
    if method == "GET" or path.endswith("index"):  # the read-only ones answer with the key
        assert _http(server, method, path, server.admin_headers(), body).status_code == 200
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="triton-grpc-protocol-admin-key"):
        client.get_model_config("env")
    assert client.get_model_config("env", headers=server.admin_headers("grpc")).config.name == "env"


def test_health_metadata_statistics_and_inference_stay_open(server: TritonServer) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/env", "/v2/models/env/ready",
                 "/v2/models/env/stats"):  # fmt: skip
        assert _http(server, "GET", path).status_code == 200, path
    assert _env_value(server, "PATH")  # HTTP inference
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("env")
    assert client.get_model_metadata("env").name == "env" and client.get_server_metadata().version
    assert client.get_inference_statistics("env").model_stats
    tensor = grpcclient.InferInput("name", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"PATH"], dtype=np.object_))
    assert client.infer("env", [tensor]).as_numpy("value")[0]  # gRPC inference


def test_the_stubs_get_the_kv_secret_and_not_the_admin_key(server: TritonServer) -> None:
    assert server.kv_secret and _env_value(server, "DISAGG_KV_SECRET") == server.kv_secret
    assert _env_value(server, "DISAGG_ADMIN_KEY") == "<unset>"


def test_your_own_lock_replaces_ours(tmp_path: Path) -> None:
    """Triton refuses to start when an API is named in two flags: given the user's HTTP lock,
    the server starts, takes their header over HTTP and ours over gRPC."""
    theirs = ["--http-restricted-api=model-repository,model-config:x-ops=opensesame-0123456789"]
    flags = ["--model-control-mode=explicit", "--load-model=*", *theirs]
    with TritonServer(model_repository=_repository(tmp_path), extra_args=flags) as srv:
        assert srv.admin_headers() == {"x-ops": "opensesame-0123456789"}
        assert _http(srv, "POST", "/v2/repository/index", {"admin-key": srv.admin_key or ""}, {}).status_code == 403
        index = _http(srv, "POST", "/v2/repository/index", srv.admin_headers(), {})
        assert index.status_code == 200 and [m["name"] for m in json.loads(index.text)] == ["env"]
        assert _http(srv, "GET", "/v2/systemsharedmemory/status").status_code == 200  # they left it open over HTTP
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException, match="triton-grpc-protocol-admin-key"):
            client.get_system_shared_memory_status()
        assert client.get_model_repository_index(headers=srv.admin_headers("grpc")).models[0].name == "env"
