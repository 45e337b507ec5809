"""One deployment file, parsed once and validated: pools, engines, routing, servers.

The file (YAML; format in the README, examples in `deployments/`) names everything that
varies between deployments; `disagg deploy` (orchestrator/tools/deploy.py) turns a `Deployment` into model
repositories, launch commands and Kubernetes manifests. Every check runs here, before a
file is written, because mistakes in a disaggregated layout otherwise surface as hangs:

- pools: `generation` is required; no `context` pool means aggregated serving (every
  request runs whole on a generation-pool engine behind the same ensemble).
- engines: `stub` or `tensorrtllm`, and the MPI world real engines share on a server
  (`orchestrator.ops.deployment_pools`, where each pool section is parsed).
- routing: each phase's policy may set only the knobs that policy reads.
- servers: absent means one server; with several, every pool and the orchestrator say
  which server hosts them, and no two servers share an address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from orchestrator.ops.deployment_pools import Pool, check_mpi_world, parse_pool, server_ref
from orchestrator.ops.deployment_pools import RealEngine as RealEngine  # importers of Pool need it too
from orchestrator.ops.deployment_schema import DeploymentError, Section, fail
from orchestrator.routing.policies import POLICIES, POLICY_KNOBS
from orchestrator.serving.config import OrchestratorConfig

ROLES = ("context", "generation")
# Policy knob -> the orchestrator parameter that carries it.
KNOB_PARAMETERS = {"seed": "routing_seed", "kv_weight": "kv_weight", "load_metric": "load_metric"}
# Orchestrator parameters the file sets elsewhere (pools, routing), not under `orchestrator.settings`.
_DERIVED = frozenset(
    {"context_engines", "generation_engines", "pool_file", "context_policy", "generation_policy",
     "local_prefill_max_tokens", "context_queue_threshold", "tokens_per_block", *KNOB_PARAMETERS.values()}
)  # fmt: skip
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
SINGLE_SERVER = "main"


@dataclass(frozen=True, slots=True)
class Server:
    """One tritonserver: where the others reach it."""

    name: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int


@dataclass(frozen=True, slots=True)
class PhaseRouting:
    policy: str
    knobs: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Kubernetes:
    namespace: str
    image: str
    project_dir: str
    gpu_resource: str


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    tokenizer_dir: str
    streaming: bool
    servers: tuple[Server, ...]
    frontend: str  # the server that hosts the ensemble and the orchestrator
    orchestrator_instances: int
    postprocessing_instances: int
    engines_over: str  # "bls": same-server engines by BLS; "grpc": every engine over gRPC
    orchestrator_settings: Mapping[str, str]
    routing: Mapping[str, PhaseRouting]
    local_prefill_max_tokens: int
    context_queue_threshold: int
    pools: tuple[Pool, ...]
    kubernetes: Kubernetes

    @property
    def aggregated(self) -> bool:
        return all(p.role != "context" for p in self.pools)

    def pool(self, role: str) -> Pool | None:
        return next((p for p in self.pools if p.role == role), None)

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def endpoint(self, pool: Pool, model: str) -> str:
        """How the orchestrator names an engine: local model, or grpc://host:port/model."""
        if pool.server == self.frontend and self.engines_over == "bls":
            return model
        server = self.server(pool.server)
        return f"grpc://{server.host}:{server.grpc_port}/{model}"

    def orchestrator_parameters(self) -> dict[str, str]:
        """The orchestrator model's `parameters`, complete (pools, routing, settings)."""
        context, generation = self.pool("context"), self.pool("generation")
        assert generation is not None, "validated: a generation pool exists"
        params = {
            "context_engines": ",".join(self.endpoint(context, m) for m in context.names) if context else "",
            "generation_engines": ",".join(self.endpoint(generation, m) for m in generation.names),
            "context_policy": self.routing["context"].policy,
            "generation_policy": self.routing["generation"].policy,
            "tokens_per_block": str(generation.tokens_per_block),
            "local_prefill_max_tokens": str(self.local_prefill_max_tokens),
            "context_queue_threshold": str(self.context_queue_threshold),
        }
        for phase in self.routing.values():
            params.update({KNOB_PARAMETERS[k]: _render(v) for k, v in phase.knobs.items()})
        params.update(self.orchestrator_settings)
        return params

    def servers_hosting(self, name: str) -> list[str]:
        parts = [f"{p.role} engines" for p in self.pools if p.server == name]
        return (["ensemble + orchestrator"] if name == self.frontend else []) + parts


def _render(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# -- parsing -----------------------------------------------------------------------------------


def load(path: Path) -> Deployment:
    """Read and validate a deployment file; errors start with the file and the key path."""
    import yaml  # only the deployment tool needs PyYAML, not the served models

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeploymentError(f"{path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse(data)
    except DeploymentError as exc:
        raise DeploymentError(f"{path}: {exc}") from None


def parse(data: Any) -> Deployment:
    top = Section.of(data, "")
    name = top.string("name", "disagg")
    if not _DNS_LABEL.match(name):
        raise fail("name", f"must be a lower-case DNS label (a-z, 0-9, '-'; at most 40), got {name!r}")
    tokenizer_dir = top.string("tokenizer_dir", "")
    streaming = top.boolean("streaming", True)
    servers = _servers(top.section("servers") if top.has("servers") else None)
    server_names = [s.name for s in servers]
    orch = top.section("orchestrator")
    frontend = server_ref(orch, server_names)
    instances = orch.integer("instances", 1, minimum=1)
    post_instances = orch.integer("postprocessing_instances", 1, minimum=1)
    engines_over = orch.string("engines_over", "bls", choices=("bls", "grpc"))
    settings = _orchestrator_settings(orch.section("settings"))
    orch.done()
    routing_section = top.section("routing")
    routing = {role: _phase_routing(routing_section, role) for role in ROLES}
    local_max = routing_section.integer("local_prefill_max_tokens", 0)
    queue_threshold = routing_section.integer("context_queue_threshold", 0)
    pools_section = top.section("pools")
    if not pools_section.has("generation"):
        raise fail(
            "pools.generation",
            "is required: the engines that generate tokens (and, without a context pool, prefill too)",
        )
    pools = tuple(
        parse_pool(pools_section.section(role), role, server_names, streaming)
        for role in ROLES
        if pools_section.has(role)
    )
    pools_section.done()
    routing_section.done()
    kubernetes = _kubernetes(top.section("kubernetes"))
    top.done()
    deployment = Deployment(
        name=name, tokenizer_dir=tokenizer_dir, streaming=streaming, servers=servers, frontend=frontend,
        orchestrator_instances=instances, postprocessing_instances=post_instances, engines_over=engines_over, orchestrator_settings=settings, routing=routing,
        local_prefill_max_tokens=local_max, context_queue_threshold=queue_threshold, pools=pools,
        kubernetes=kubernetes,
    )  # fmt: skip
    _check_whole(deployment)
    return deployment


def _servers(section: Section | None) -> tuple[Server, ...]:
    if section is None:
        return (Server(SINGLE_SERVER, "127.0.0.1", 8000, 8001, 8002),)
    if not section.data:
        raise fail("servers", "must name at least one server, or be left out for a single server")
    servers = []
    for name in section.data:
        if not _DNS_LABEL.match(name):
            raise fail(section.key(name), "server names must be lower-case DNS labels (a-z, 0-9, '-')")
        s = section.section(name)
        server = Server(
            name, s.string("host", "127.0.0.1"), s.integer("http_port", 8000, 1, 65535),
            s.integer("grpc_port", 8001, 1, 65535), s.integer("metrics_port", 8002, 1, 65535),
        )  # fmt: skip
        s.done()
        if len({server.http_port, server.grpc_port, server.metrics_port}) != 3:
            raise fail(s.path, "http_port, grpc_port and metrics_port must differ")
        servers.append(server)
    taken: dict[tuple[str, int], str] = {}
    for server in servers:
        for port in (server.http_port, server.grpc_port, server.metrics_port):
            other = taken.setdefault((server.host, port), server.name)
            if other != server.name:
                raise fail(f"servers.{server.name}", f"{server.host}:{port} is also used by server {other!r}")
    return tuple(servers)


def _orchestrator_settings(section: Section) -> dict[str, str]:
    known = {f.name for f in fields(OrchestratorConfig)}
    values: dict[str, str] = {}
    for key, value in section.data.items():
        if key in _DERIVED:
            raise fail(section.key(key), "is set by the deployment's pools and routing sections, not here")
        if key not in known:
            raise fail(
                section.key(key),
                f"unknown orchestrator setting; see orchestrator/serving/config.py: {sorted(known - _DERIVED)}",
            )
        values[key] = _render(value)
        section.seen.add(key)
    try:  # the orchestrator's own checks, with placeholder pools
        OrchestratorConfig.from_parameters({"context_engines": "c", "generation_engines": "g", **values})
    except ValueError as exc:
        raise fail(section.path, str(exc)) from None
    return values


def _phase_routing(routing: Section, role: str) -> PhaseRouting:
    s = routing.section(role)
    policy = s.string("policy", "round_robin", choices=sorted(POLICIES))
    knobs: dict[str, Any] = {}
    allowed = POLICY_KNOBS[policy]
    for key in s.data:
        if key == "policy":
            continue
        if key not in allowed:
            what = ", ".join(allowed) or "none"
            raise fail(s.key(key), f"policy {policy!r} has no knob {key!r}; its knobs: {what}")
        knobs[key] = s.raw(key)
    try:
        OrchestratorConfig(("c",), ("g",), **{KNOB_PARAMETERS[k]: v for k, v in knobs.items()})
    except (TypeError, ValueError) as exc:
        raise fail(s.path, str(exc)) from None
    s.done()
    return PhaseRouting(policy, knobs)


def _kubernetes(s: Section) -> Kubernetes:
    k = Kubernetes(
        namespace=s.string("namespace", "default"),
        image=s.string("image", "nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3"),
        project_dir=s.string("project_dir", "/opt/disagg"),
        gpu_resource=s.string("gpu_resource", "nvidia.com/gpu"),
    )
    if not _DNS_LABEL.match(k.namespace):
        raise fail(s.key("namespace"), f"must be a lower-case DNS label, got {k.namespace!r}")
    s.done()
    return k


def _check_whole(d: Deployment) -> None:
    """Checks across sections: what one server's engines share, what pools must agree on."""
    context, generation = d.pool("context"), d.pool("generation")
    assert generation is not None
    if context is not None and context.tokens_per_block != generation.tokens_per_block:
        raise fail(
            "pools.context.tokens_per_block",
            f"is {context.tokens_per_block} but the generation pool's is {generation.tokens_per_block}: the "
            "KV cache moves block by block and the router hashes one block size, so they must match",
        )
    merged: dict[str, Any] = {}
    for role, phase in d.routing.items():
        for knob, value in phase.knobs.items():
            if knob in merged and merged[knob][1] != value:
                raise fail(
                    f"routing.{role}.{knob}",
                    f"is {value!r} but routing.{merged[knob][0]}.{knob} is {merged[knob][1]!r}: the orchestrator "
                    "has one value per knob for both phases",
                )
            merged[knob] = (role, value)
    if d.aggregated and (d.local_prefill_max_tokens or d.context_queue_threshold):
        raise fail("routing", "local_prefill_max_tokens / context_queue_threshold need a context pool")
    real = [p for p in d.pools if p.kind == "tensorrtllm"]
    if real and not d.tokenizer_dir:
        raise fail("tokenizer_dir", "tensorrtllm engines need their model's tokenizer: a folder with tokenizer.json")
    used = {d.frontend, *(p.server for p in d.pools)}
    for server in d.servers:
        if server.name not in used:
            raise fail(
                f"servers.{server.name}", "hosts nothing: remove it or name it in a pool's or the orchestrator's server"
            )
        check_mpi_world(server.name, [p for p in real if p.server == server.name], len(d.servers) > 1)


def mpi_world_size(d: Deployment, server: str) -> int:
    """Ranks of one server's MPI world (1 + the ranks of its real engines), 0 without real engines."""
    ranks = sum(p.world_size * p.engines for p in d.pools if p.kind == "tensorrtllm" and p.server == server)
    return ranks + 1 if ranks else 0
