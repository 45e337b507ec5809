"""Deployment files: every validation error names its key; the examples parse; the default
file generates the committed repository; real-engine configs parse as Triton model configs
with the tensorrt_llm contract; launch scripts and Kubernetes manifests are well formed; every
server of a deployment gets the same secrets (secrets.env, the Kubernetes Secret)."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orchestrator.ops.access import ADMIN_KEY_ENV, KV_SECRET_ENV
from orchestrator.ops.deployment import DeploymentError, load, mpi_world_size, parse
from orchestrator.ops.k8s_manifests import manifests
from orchestrator.ops.launch_plan import launch_script
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.tools.deploy import (
    CLUSTER_NETWORKS,
    build,
    check_manifests,
    deployment_secrets,
    main,
    with_kv_transfer_host,
    write_manifests,
)
from orchestrator.tools.repository import DEFAULT_REPOSITORY

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "deployments").glob("*.yaml"))

REAL: dict[str, Any] = {
    "tokenizer_dir": "/tok",
    "pools": {
        "context": {"engines": 2, "kind": "tensorrtllm", "tensor_parallel": 2, "engine_dir": "/e/ctx",
                    "gpu_device_ids": [[0, 1], [2, 3]], "participant_ids": [[1, 2], [3, 4]]},
        "generation": {"engines": 1, "kind": "tensorrtllm", "engine_dir": "/e/gen",
                       "gpu_device_ids": [[4]], "participant_ids": [[5]]},
    },
}  # fmt: skip
STUBS: dict[str, Any] = {"pools": {"context": {"engines": 1}, "generation": {"engines": 1}}}
THREE: dict[str, Any] = {
    "servers": {"front": {"grpc_port": 9001, "http_port": 9000, "metrics_port": 9002},
                "gpu": {"grpc_port": 9101, "http_port": 9100, "metrics_port": 9102}},
    "orchestrator": {"server": "front"},
    "pools": {"context": {"server": "gpu"}, "generation": {"server": "gpu"}},
}  # fmt: skip


def edited(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`base` with the dotted key set to `value` (`None` deletes it)."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    "base, key, value, message",
    [
        # real engines: one MPI world per server
        (
            REAL,
            "pools.generation.participant_ids",
            [[4]],
            r"pools.generation.participant_ids\[0\]: rank 4 is also used by pools.context engine 1",
        ),
        (
            REAL,
            "pools.generation.gpu_device_ids",
            [[1]],
            r"pools.generation.gpu_device_ids\[0\]: GPU 1 is also used by pools.context engine 0",
        ),
        (
            REAL,
            "pools.generation.participant_ids",
            [[7]],
            r"participant_ids: .*ranks \[1, 2, 3, 4, 7\] but their MPI world has 6 ranks.*exactly 1..5",
        ),
        (
            REAL,
            "pools.context.gpu_device_ids",
            [[0], [2]],
            r"gpu_device_ids\[0\]: engine 0 lists 1 GPU device ids but its world size .* is 2",
        ),
        (
            REAL,
            "pools.context.participant_ids",
            [[1, 2]],
            r"participant_ids: lists 1 engine\(s\) but the pool has engines: 2",
        ),
        (REAL, "pools.context.participant_ids", "1,2", r"participant_ids: must list .* one list per engine"),
        (REAL, "pools.context.engine_dir", None, r"pools.context.engine_dir: a tensorrtllm pool needs"),
        (REAL, "tokenizer_dir", None, r"tokenizer_dir: tensorrtllm engines need"),
        (
            REAL,
            "pools.context.stub",
            {"prefill_us_per_token": 10},
            r"pools.context.stub: stub-only options on a tensorrtllm pool",
        ),
        (REAL, "pools.context.kv_cache_free_gpu_mem_fraction", 1.5, r"kv_cache_free_gpu_mem_fraction: must be between"),
        (STUBS, "pools.context.engine_dir", "/e", r"pools.context.engine_dir: is an option of tensorrtllm engines"),
        (
            STUBS,
            "pools.generation.gpu_device_ids",
            [[0]],
            r"pools.generation.gpu_device_ids: is an option of tensorrtllm",
        ),
        # streaming needs decoupled engines
        (STUBS, "pools.generation.decoupled", False, r"pools.generation.decoupled: is false, but streaming is on"),
        (REAL, "pools.context.decoupled", False, r"pools.context.decoupled: is false"),
        # routing
        (
            STUBS,
            "routing.context",
            {"policy": "round_robin", "kv_weight": 2},
            r"routing.context.kv_weight: policy 'round_robin' has no knob 'kv_weight'; its knobs: none",
        ),
        (
            STUBS,
            "routing.generation",
            {"policy": "least_loaded", "seed": 3},
            r"routing.generation.seed: .*its knobs: load_metric",
        ),
        (STUBS, "routing.context", {"policy": "fastest"}, r"routing.context.policy: must be one of"),
        (
            STUBS,
            "routing.generation",
            {"policy": "least_loaded", "load_metric": "gpu"},
            r"routing.generation: .*load_metric must be one of",
        ),
        (
            edited(STUBS, "routing.context", {"policy": "kv_aware", "kv_weight": 1}),
            "routing.generation",
            {"policy": "kv_aware", "kv_weight": 2},
            r"routing.generation.kv_weight: is 2 but routing.context.kv_weight is 1",
        ),
        (
            edited(STUBS, "pools.context", None),
            "routing.local_prefill_max_tokens",
            64,
            r"routing: local_prefill_max_tokens .* need a context pool",
        ),
        # pools and stub knobs
        (STUBS, "pools.generation.engines", 0, r"pools.generation.engines: must be >= 1, got 0"),
        (STUBS, "pools.generation", None, r"pools.generation: is required"),
        (STUBS, "pools.context.tensor_parallel", 3, r"pools.context: engine parameter .*tensor_parallel_size"),
        (
            STUBS,
            "pools.context.tokens_per_block",
            16,
            r"pools.context.tokens_per_block: is 16 but the generation pool's is 32",
        ),
        (STUBS, "pools.context.stub", {"fault": "boom"}, r"pools.context: engine parameter 'fault' must be one of"),
        (
            STUBS,
            "pools.context.stub",
            {"prefil_us_per_token": 3},
            r"pools.context.stub.prefil_us_per_token: unknown stub engine knob",
        ),
        (
            STUBS,
            "pools.context.stub",
            {"tensor_parallel_size": 2},
            r"pools.context.stub.tensor_parallel_size: is set on the pool itself",
        ),
        (
            STUBS,
            "pools.context.stub",
            {"step_overhead_ms": [1]},
            r"pools.context.stub.step_overhead_ms: must be a single value",
        ),
        (
            STUBS,
            "pools.context.stub",
            {"max_queued_requests": -1},
            r"pools.context: engine parameter 'max_queued_requests' must be >= 0 \(0: unlimited\), got -1",
        ),
        (STUBS, "pools.context.enginez", 2, r"pools.context.enginez: unknown key; this section takes: .*engines"),
        (
            STUBS,
            "pools.prefill",
            {"engines": 1},
            r"pools.prefill: unknown key; this section takes: context, generation",
        ),
        (STUBS, "pool", {}, r"pool: unknown key"),
        (STUBS, "pools.context.engines", "two", r"pools.context.engines: must be a whole number, got 'two'"),
        # orchestrator
        (
            STUBS,
            "orchestrator.settings",
            {"max_retrys": 1},
            r"orchestrator.settings.max_retrys: unknown orchestrator setting",
        ),
        (
            STUBS,
            "orchestrator.settings",
            {"context_policy": "random"},
            r"orchestrator.settings.context_policy: is set by the deployment's pools and routing",
        ),
        (
            STUBS,
            "orchestrator.settings",
            {"engine_timeout_s": 0},
            r"orchestrator.settings: .*'engine_timeout_s' must be > 0",
        ),
        (
            STUBS,
            "orchestrator.settings",
            {"max_in_flight": -1},
            r"orchestrator.settings: .*'max_in_flight' must be >= 0, got -1",
        ),
        (
            STUBS,
            "orchestrator.settings",
            {"max_in_flight": "many"},
            r"orchestrator.settings: .*'max_in_flight' must be a int, got 'many'",
        ),
        (STUBS, "orchestrator.instances", 0, r"orchestrator.instances: must be >= 1"),
        (STUBS, "orchestrator.postprocessing_instances", 0, r"orchestrator.postprocessing_instances: must be >= 1"),
        # servers
        (THREE, "pools.context.server", None, r"pools.context.server: several servers are defined"),
        (
            THREE,
            "pools.context.server",
            "cpu",
            r"pools.context.server: unknown server 'cpu'; defined: \['front', 'gpu'\]",
        ),
        (THREE, "servers.gpu.grpc_port", 9000, r"servers.gpu: 127.0.0.1:9000 is also used by server 'front'"),
        (
            THREE,
            "servers.spare",
            {"http_port": 9200, "grpc_port": 9201, "metrics_port": 9202},
            r"servers.spare: hosts nothing",
        ),
        (THREE, "servers.gpu.http_port", 9101, r"servers.gpu: http_port, grpc_port and metrics_port must differ"),
        (THREE, "servers.Front", {}, r"servers.Front: server names must be lower-case DNS labels"),
        (STUBS, "name", "My Deployment", r"name: must be a lower-case DNS label"),
        (STUBS, "kubernetes.namespace", "Prod", r"kubernetes.namespace: must be a lower-case DNS label"),
    ],
)
def test_validation_errors_name_the_key(base: dict[str, Any], key: str, value: Any, message: str) -> None:
    parse(base)  # the base itself is valid: the edit is what fails
    with pytest.raises(DeploymentError, match=message):
        parse(edited(base, key, value))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_files_are_valid(path: Path) -> None:
    deployment = load(path)
    assert deployment.pool("generation") is not None


def test_load_reports_the_file_and_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed\n")
    with pytest.raises(DeploymentError, match=r"bad.yaml: not valid YAML"):
        load(bad)
    bad.write_text("pools:\n  generation:\n    engines: -1\n")
    with pytest.raises(DeploymentError, match=r"bad.yaml: pools.generation.engines: must be >= 1, got -1"):
        load(bad)


def test_check_command_exits_2_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  context: {policy: random, kv_weight: 3}\n")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "disagg"), "deploy", "check", str(bad)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "routing.context.kv_weight: policy 'random' has no knob 'kv_weight'" in done.stderr
    assert "Traceback" not in done.stderr


def _code(version: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in version.iterdir() if p.is_file()}


def test_default_file_generates_the_committed_repository(tmp_path: Path) -> None:
    """The committed model_repository is what deployments/default.yaml describes, byte for byte."""
    repos = build(load(ROOT / "deployments" / "default.yaml"), tmp_path)
    generated = sorted(p.name for p in repos["main"].iterdir())
    assert generated == [
        "context_0",
        "context_1",
        "ensemble",
        "generation_0",
        "generation_1",
        "orchestrator",
        "postprocessing",
        "preprocessing",
    ]
    for name in generated:
        assert (repos["main"] / name / "config.pbtxt").read_text() == (
            DEFAULT_REPOSITORY / name / "config.pbtxt"
        ).read_text(), name
        assert _code(repos["main"] / name / "1") == _code(DEFAULT_REPOSITORY / name / "1"), name


def test_instance_counts_reach_the_generated_configs(tmp_path: Path) -> None:
    deployment = parse(edited(edited(STUBS, "orchestrator.instances", 3), "orchestrator.postprocessing_instances", 2))
    repos = build(deployment, tmp_path)
    counts = {
        m: _model_config(repos["main"] / m / "config.pbtxt").instance_group[0].count
        for m in ("orchestrator", "postprocessing")
    }
    assert counts == {"orchestrator": 3, "postprocessing": 2}
    post = _model_config(repos["main"] / "postprocessing" / "config.pbtxt")
    assert post.dynamic_batching.preserve_ordering  # what keeps streams in order with several instances


def test_load_bounds_reach_the_generated_configs(tmp_path: Path) -> None:
    """`max_in_flight` (orchestrator setting) and `max_queued_requests` (stub knob; 0 = unlimited)
    are passed through like every other key, and the models parse them back at load."""
    data = edited(STUBS, "orchestrator.settings", {"max_in_flight": 256})
    data = edited(data, "pools.generation.stub", {"max_queued_requests": 0})
    data = edited(data, "pools.context.stub", {"max_queued_requests": 32})
    repo = build(parse(data), tmp_path)["main"]

    def params(model: str) -> dict[str, str]:
        return {k: v.string_value for k, v in _model_config(repo / model / "config.pbtxt").parameters.items()}

    assert OrchestratorConfig.from_parameters(params("orchestrator")).max_in_flight == 256
    assert EngineConfig.from_parameters(params("generation_0")).max_queued_requests == 0
    assert EngineConfig.from_parameters(params("context_0")).max_queued_requests == 32


def test_engines_over_grpc_names_even_local_engines_by_endpoint() -> None:
    deployment = parse(edited(STUBS, "orchestrator.engines_over", "grpc"))
    params = deployment.orchestrator_parameters()
    assert params["context_engines"] == "grpc://127.0.0.1:8001/context_0"
    assert params["generation_engines"] == "grpc://127.0.0.1:8001/generation_0"
    with pytest.raises(DeploymentError, match=r"orchestrator.engines_over: must be one of \['bls', 'grpc'\]"):
        parse(edited(STUBS, "orchestrator.engines_over", "tcp"))


def test_aggregated_file_has_no_context_engines(tmp_path: Path) -> None:
    deployment = load(ROOT / "deployments" / "aggregated.yaml")
    params = deployment.orchestrator_parameters()
    assert (
        params["context_engines"] == ""
        and params["generation_engines"] == "generation_0,generation_1,generation_2,generation_3"
    )
    assert params["generation_policy"] == "least_loaded" and params["load_metric"] == "tokens"
    generation = deployment.pool("generation")
    assert generation is not None and EngineConfig.from_parameters(generation.stub).enable_chunked_context


def test_a_tensorrtllm_pool_passes_chunked_context_to_the_backend(tmp_path: Path) -> None:
    """The backend parameter of the stub knob's name reaches a real engine's config through the
    pool's `parameters`; a pool that does not set it leaves the backend's default (off)."""
    repo = build(parse(edited(REAL, "pools.generation.parameters", {"enable_chunked_context": True})), tmp_path)["main"]

    def params(model: str) -> dict[str, str]:
        return {k: v.string_value for k, v in _model_config(repo / model / "config.pbtxt").parameters.items()}

    assert params("generation_0")["enable_chunked_context"] == "true"
    assert "enable_chunked_context" not in params("context_0")


def _model_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_tensorrtllm_configs_parse_and_keep_the_contract(tmp_path: Path) -> None:
    deployment = parse(REAL)
    repo = build(deployment, tmp_path)["main"]
    stub = _model_config(DEFAULT_REPOSITORY / "context_0" / "config.pbtxt")
    for name, ranks, gpus in (("context_0", "1,2", "0,1"), ("context_1", "3,4", "2,3"), ("generation_0", "5", "4")):
        text = (repo / name / "config.pbtxt").read_text()
        assert "${" not in text
        config = _model_config(repo / name / "config.pbtxt")
        assert (config.name, config.backend, config.max_batch_size) == (name, "tensorrtllm", 64)
        assert config.model_transaction_policy.decoupled
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["participant_ids"] == ranks and params["gpu_device_ids"] == gpus
        assert params["gpt_model_type"] == "inflight_fused_batching"
        assert params["gpt_model_path"] == ("/e/ctx" if name.startswith("context") else "/e/gen")
        for required in (
            "tokenizer_dir",
            "xgrammar_tokenizer_info_path",
            "guided_decoding_backend",
            "executor_worker_path",
        ):
            assert required in params
        inputs = {t.name: (t.data_type, list(t.dims), t.optional) for t in config.input}
        assert inputs == {t.name: (t.data_type, list(t.dims), t.optional) for t in stub.input}
        assert inputs["context_phase_params"] == (model_config_pb2.TYPE_UINT8, [-1], True)
        assert not inputs["input_lengths"][2] and not inputs["request_output_len"][2]
        outputs = {t.name: t.data_type for t in config.output}
        assert outputs["context_phase_params"] == model_config_pb2.TYPE_UINT8
        assert outputs["output_ids"] == outputs["sequence_length"] == model_config_pb2.TYPE_INT32
        assert outputs["context_logits"] == outputs["generation_logits"] == model_config_pb2.TYPE_FP32
        assert (repo / name / "1").is_dir() and not any((repo / name / "1").iterdir())
    assert mpi_world_size(deployment, "main") == 6


def test_launch_script_starts_one_rank_per_gpu_plus_tritonserver() -> None:
    script = launch_script(parse(REAL), "main")
    assert "TRTLLM_ORCHESTRATOR=1" in script
    assert script.count("-n 1 tritonserver") == 6
    assert "--load-model=context_0 --load-model=context_1 --load-model=generation_0" in script
    assert script.count("--http-port=8000") == 1  # only rank 0 serves
    stub = launch_script(parse(STUBS), "main")
    assert "mpirun" not in stub and "--grpc-port=8001" in stub


def test_three_server_file_points_the_frontend_at_the_engine_servers(tmp_path: Path) -> None:
    deployment = load(ROOT / "deployments" / "three-server.yaml")
    params = deployment.orchestrator_parameters()
    assert params["context_engines"] == "grpc://127.0.0.1:8101/context_0,grpc://127.0.0.1:8101/context_1"
    assert params["generation_engines"] == "grpc://127.0.0.1:8201/generation_0,grpc://127.0.0.1:8201/generation_1"
    repos = build(deployment, tmp_path)
    assert sorted(p.name for p in repos["context"].iterdir()) == ["context_0", "context_1"]
    assert sorted(p.name for p in repos["frontend"].iterdir()) == [
        "ensemble",
        "orchestrator",
        "postprocessing",
        "preprocessing",
    ]
    assert (tmp_path / "launch-generation.sh").stat().st_mode & 0o111


@pytest.mark.parametrize("name", ["three-server", "trtllm-1ctx-1gen"])
def test_kubernetes_manifests_validate_and_probe_health(name: str, tmp_path: Path) -> None:
    path = ROOT / "deployments" / f"{name}.yaml"
    docs = write_manifests(load(path), path, tmp_path / "k8s.yaml", validate=True)
    assert list(yaml.safe_load_all((tmp_path / "k8s.yaml").read_text())) == docs
    config_map, *rest = docs
    in_cluster = parse(yaml.safe_load(config_map["data"]["deployment.yaml"]))
    deployments = [d for d in rest if d["kind"] == "Deployment"]
    assert len(deployments) == len(in_cluster.servers) == len([d for d in rest if d["kind"] == "Service"])
    for server, manifest in zip(in_cluster.servers, deployments):
        if len(in_cluster.servers) > 1:
            assert server.host == manifest["metadata"]["name"]  # peers reach it by its Service name
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert (
            f"--server {server.name}" in container["command"][-1]
            and '--kv-transfer-host "$POD_IP"' in container["command"][-1]
        )
        assert container["env"] == [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "DISAGG_KV_SECRET",
                "valueFrom": {"secretKeyRef": {"name": f"{in_cluster.name}-secrets", "key": "kv-secret"}},
            },
            {
                "name": "DISAGG_ADMIN_KEY",
                "valueFrom": {"secretKeyRef": {"name": f"{in_cluster.name}-secrets", "key": "admin-key"}},
            },
        ]
    gpus = [d["spec"]["template"]["spec"]["containers"][0].get("resources", {}) for d in deployments]
    assert gpus == ([{"limits": {"nvidia.com/gpu": 2}}] if name.startswith("trtllm") else [{}, {}, {}])


def test_a_broken_manifest_fails_the_schema_check() -> None:
    deployment = parse(STUBS)
    docs = manifests(deployment, "name: x\n")
    [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["replicas"] = "one"
    with pytest.raises(DeploymentError, match=r"Deployment disagg-main: spec/replicas"):
        check_manifests(docs)
    assert kubernetes_validate.latest_version()


def _parameter(config: Path, key: str) -> str:
    params = {k: v.string_value for k, v in _model_config(config).parameters.items()}
    return params[key]


def test_a_pod_builds_its_stub_engines_with_its_own_kv_address(tmp_path: Path) -> None:
    """What each Kubernetes pod runs: only its server, stub engines serving KV on its IP;
    a kv_transfer_host written in the file wins."""
    assert main(["build", str(ROOT / "deployments" / "three-server.yaml"), "--server", "context",
                 "--kv-transfer-host", "10.1.2.3", "--out", str(tmp_path / "pod")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "pod").iterdir()) == ["context", "launch-context.sh", "secrets.env"]
    assert _parameter(tmp_path / "pod" / "context" / "context_0" / "config.pbtxt", "kv_transfer_host") == "10.1.2.3"
    pinned = parse(edited(THREE, "pools.context.stub", {"kv_transfer_host": "192.0.2.7"}))
    moved = with_kv_transfer_host(pinned, "gpu", "10.1.2.3")
    assert [p.stub["kv_transfer_host"] for p in moved.pools] == ["192.0.2.7", "10.1.2.3"]
    assert main(["build", str(ROOT / "deployments" / "three-server.yaml"), "--kv-transfer-host", "10.1.2.3",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip


def test_generation_engines_pull_only_from_the_hosts_the_deployment_names(tmp_path: Path) -> None:
    """Engines serving KV on a named host: every stub engine may pull from it (and loopback),
    nothing else. In a pod, peers' IPs are unknown: cluster networks, never the whole internet.
    A kv_peer_hosts written in the file wins."""
    named = parse(edited(THREE, "pools.context.stub", {"kv_transfer_host": "192.0.2.7"}))
    build(named, tmp_path / "named")
    peers = _parameter(tmp_path / "named" / "gpu" / "generation_0" / "config.pbtxt", "kv_peer_hosts")
    assert peers.split(",") == ["127.0.0.0/8", "::1", "localhost", "192.0.2.7"]
    pod = with_kv_transfer_host(parse(THREE), "gpu", "10.1.2.3")
    assert all(p.stub["kv_peer_hosts"] == CLUSTER_NETWORKS for p in pod.pools if p.server == "gpu")
    own = parse(edited(THREE, "pools.generation.stub", {"kv_peer_hosts": "10.9.0.0/16"}))
    assert [p.stub.get("kv_peer_hosts") for p in with_kv_transfer_host(own, "gpu", "10.1.2.3").pools][
        -1
    ] == "10.9.0.0/16"
    build(parse(THREE), tmp_path / "loopback")  # all on loopback: the engines' own default stays
    config = (tmp_path / "loopback" / "gpu" / "generation_0" / "config.pbtxt").read_text()
    assert "kv_peer_hosts" not in config


# -- secrets every server of a deployment shares --------------------------------------
def _secrets(out: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in (out / "secrets.env").read_text().splitlines() if not line.startswith("#")
    )


def test_build_writes_private_secrets_and_a_rebuild_keeps_them(tmp_path: Path) -> None:
    deployment = load(ROOT / "deployments" / "three-server.yaml")
    build(deployment, tmp_path / "a")
    first = _secrets(tmp_path / "a")
    assert sorted(first) == [ADMIN_KEY_ENV, KV_SECRET_ENV] and all(len(v) >= 32 for v in first.values())
    assert first[ADMIN_KEY_ENV] != first[KV_SECRET_ENV]
    assert stat.S_IMODE((tmp_path / "a" / "secrets.env").stat().st_mode) == 0o600
    (tmp_path / "a" / "secrets.env").chmod(0o644)
    build(deployment, tmp_path / "a")  # a rebuild must not rotate them under running servers
    assert _secrets(tmp_path / "a") == first == deployment_secrets(tmp_path / "a")
    assert stat.S_IMODE((tmp_path / "a" / "secrets.env").stat().st_mode) == 0o600
    assert (
        main(
            [
                "build",
                str(ROOT / "deployments" / "three-server.yaml"),
                "--server",
                "context",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert _secrets(tmp_path / "a") == first  # one server's rebuild (what a pod does) too
    build(deployment, tmp_path / "b")
    assert all(_secrets(tmp_path / "b")[k] != first[k] for k in first)  # another build: its own


def test_a_secrets_file_missing_a_value_gets_one_and_a_broken_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text(f"# kept\n{KV_SECRET_ENV}='mine,older'\n")
    values = deployment_secrets(tmp_path)
    assert values[KV_SECRET_ENV] == "mine,older" and len(values[ADMIN_KEY_ENV]) >= 32
    assert _secrets(tmp_path)[KV_SECRET_ENV] in ("mine,older", "'mine,older'")
    assert deployment_secrets(tmp_path) == values
    path.write_text("DISAGG_KV_SECRET = spaced\n")
    with pytest.raises(DeploymentError, match=r"secrets.env:1: expected NAME=value"):
        deployment_secrets(tmp_path)
    path.write_text(f"{ADMIN_KEY_ENV}=short\n")
    with pytest.raises(DeploymentError, match=r"secrets.env: DISAGG_ADMIN_KEY is 5 characters long; use at least 16"):
        deployment_secrets(tmp_path)


_FAKE = """#!/usr/bin/env bash
# Stands in for {name}: records its arguments and the secrets in its environment, then exits.
{{ printf '%s\\n' "$@"; echo "env KV=${{DISAGG_KV_SECRET:-unset}} ADMIN=${{DISAGG_ADMIN_KEY:-unset}}"; }} > "$FAKE_OUT"
"""


def _run_launch_script(
    out: Path, server: str, env: dict[str, str], tool: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run `out/launch-<server>.sh` with `tool` (tritonserver or mpirun) replaced by a recorder."""
    bin_dir = out / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / tool
    fake.write_text(_FAKE.format(name=tool))
    fake.chmod(0o755)
    record = out / "record.txt"
    record.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in (ADMIN_KEY_ENV, KV_SECRET_ENV, "TRITONSERVER")}
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), base.get("PATH", "")])
    done = subprocess.run(
        ["bash", str(out / f"launch-{server}.sh")], env={**base, "PATH": path, "FAKE_OUT": str(record), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done, record.read_text() if record.exists() else ""


def test_launch_scripts_load_the_secrets_unless_they_are_set(tmp_path: Path) -> None:
    """The script as a user runs it, through the project's launcher, with a recorder in place
    of tritonserver: secrets.env fills what the environment does not set."""
    build(parse(STUBS), tmp_path)
    secrets = _secrets(tmp_path)
    done, seen = _run_launch_script(tmp_path, "main", {}, "tritonserver")
    assert done.returncode == 0, done.stderr
    lock = f"model-repository,model-config,shared-memory,trace,logging:admin-key={secrets[ADMIN_KEY_ENV]}"
    assert (
        f"--http-restricted-api={lock}" in seen.splitlines()
        and f"--grpc-restricted-protocol={lock}" in seen.splitlines()
    )
    # the KV secret reaches the server's environment; the admin key only its flags
    assert f"env KV={secrets[KV_SECRET_ENV]} ADMIN=unset" in seen
    key_file = tmp_path / "admin-key"
    assert key_file.read_text().strip() == secrets[ADMIN_KEY_ENV] and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    done, seen = _run_launch_script(tmp_path, "main", {KV_SECRET_ENV: "from-env"}, "tritonserver")
    assert done.returncode == 0 and "env KV=from-env ADMIN=unset" in seen and lock in seen
    (tmp_path / "secrets.env").unlink()
    done, seen = _run_launch_script(tmp_path, "main", {}, "tritonserver")
    assert done.returncode == 1 and seen == ""
    assert "secrets.env is missing and DISAGG_KV_SECRET / DISAGG_ADMIN_KEY are not both set" in done.stderr
    both = {KV_SECRET_ENV: "kv-from-env", ADMIN_KEY_ENV: "admin-key-from-env-1234"}
    done, seen = _run_launch_script(tmp_path, "main", both, "tritonserver")
    assert (
        done.returncode == 0
        and "env KV=kv-from-env ADMIN=unset" in seen
        and "admin-key=admin-key-from-env-1234" in seen
    )


def test_the_mpi_world_loads_the_secrets_and_locks_every_rank(tmp_path: Path) -> None:
    build(parse(REAL), tmp_path)
    secrets = _secrets(tmp_path)
    done, seen = _run_launch_script(tmp_path, "main", {}, "mpirun")
    assert done.returncode == 0, done.stderr
    args = seen.splitlines()
    assert args.count("tritonserver") == 6
    lock = f"model-repository,model-config,shared-memory,trace,logging:admin-key={secrets[ADMIN_KEY_ENV]}"
    assert args.count(f"--http-restricted-api={lock}") == 6 and args.count(f"--grpc-restricted-protocol={lock}") == 6
    assert f"env KV={secrets[KV_SECRET_ENV]} ADMIN={secrets[ADMIN_KEY_ENV]}" in seen  # mpirun passes both on


def test_kubernetes_pods_share_one_secret(tmp_path: Path) -> None:
    path = ROOT / "deployments" / "three-server.yaml"
    docs = write_manifests(load(path), path, tmp_path / "k8s.yaml", validate=True)
    assert stat.S_IMODE((tmp_path / "k8s.yaml").stat().st_mode) == 0o600  # it holds the Secret
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "three-server-secrets" and secret["type"] == "Opaque"
    values = secret["stringData"]
    assert sorted(values) == ["admin-key", "kv-secret"] and all(len(v) >= 32 for v in values.values())
    for deployment in [d for d in docs if d["kind"] == "Deployment"]:
        env = {e["name"]: e["valueFrom"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env[KV_SECRET_ENV] == {"secretKeyRef": {"name": "three-server-secrets", "key": "kv-secret"}}
        assert env[ADMIN_KEY_ENV] == {"secretKeyRef": {"name": "three-server-secrets", "key": "admin-key"}}
    other = write_manifests(load(path), path, tmp_path / "other.yaml", validate=False)
    (other_secret,) = [d for d in other if d["kind"] == "Secret"]
    assert all(other_secret["stringData"][k] != values[k] for k in values)  # each run: its own
    again = write_manifests(load(path), path, tmp_path / "k8s.yaml", validate=False)
    assert [d for d in again if d["kind"] == "Secret"] == [secret]  # rewriting a file keeps its Secret
