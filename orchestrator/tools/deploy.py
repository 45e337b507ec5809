"""One deployment file -> validated model repositories, launch scripts, Kubernetes manifests.

    disagg deploy check deployments/default.yaml          # validate, print the plan
    disagg deploy build deployments/three-server.yaml --out /srv/disagg
        # -> /srv/disagg/{frontend,context,generation}/, launch-<server>.sh for each, secrets.env
    disagg deploy k8s deployments/three-server.yaml --out disagg.yaml --validate

The file format is in the README ("Deployments"); every error names the key at fault.
Stub engines' configs are derived from the committed `model_repository/` (the version
folders link to its code); `tensorrtllm` engines get the real backend's config.

Every server of a deployment must share two secrets (orchestrator/ops/access.py): the KV
secret that signs KV handoffs between engines and the admin key that locks Triton's admin
APIs. `build` keeps them in `OUT/secrets.env` (mode 0600), made once: a rebuild into the same
folder keeps them, so servers started before and after it still agree. `k8s` puts them in
one Secret, which every container reads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from orchestrator.ops.access import ADMIN_KEY_ENV, KV_SECRET_ENV, check_admin_key, new_secret, write_private
from orchestrator.ops.deployment import Deployment, DeploymentError, Pool, load, mpi_world_size
from orchestrator.ops.k8s_manifests import SECRET_KEYS, in_cluster_file, manifests, secret_name
from orchestrator.ops.launch_plan import SECRETS_FILE, launch_script
from orchestrator.ops.trtllm_config import tensorrt_llm_config
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.tools.launch import TritonServer, free_port
from orchestrator.tools.repository import (
    DEFAULT_REPOSITORY,
    FRONTEND_MODELS,
    REPO_ROOT,
    ModelSpec,
    set_instance_count,
    set_max_batch_size,
    write_model,
)

# Which committed stub engine a pool's engines are derived from.
_STUB_SOURCE = {"context": "context_0", "generation": "generation_0"}


def _frontend_specs(d: Deployment) -> dict[str, ModelSpec]:
    max_input = min(p.max_input_len for p in d.pools)
    overrides = {
        "preprocessing": {"tokenizer_dir": d.tokenizer_dir, "max_input_len": str(max_input)},
        "orchestrator": d.orchestrator_parameters(),
        "postprocessing": {"tokenizer_dir": d.tokenizer_dir},
    }
    return {model: ModelSpec(model, overrides.get(model, {})) for model in FRONTEND_MODELS}


def _write_engine(dest: Path, d: Deployment, pool: Pool, index: int, source: Path) -> None:
    name = pool.names[index]
    if pool.kind == "stub":
        model_dir = write_model(dest, name, ModelSpec(_STUB_SOURCE[pool.role], pool.stub), source)
        config = model_dir / "config.pbtxt"
        config.write_text(set_max_batch_size(config.read_text(), pool.max_batch_size))
        return
    model_dir = dest / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # the backend needs a version folder, empty
    text = tensorrt_llm_config(name, pool, pool.real[index], d.tokenizer_dir)
    (model_dir / "config.pbtxt").write_text(text)


# Where pods' addresses come from in a cluster: private and carrier-grade NAT ranges, loopback.
CLUSTER_NETWORKS = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7,127.0.0.0/8,::1"


def with_kv_transfer_host(d: Deployment, server: str, host: str) -> Deployment:
    """`d` with the stub engines of `server` serving their KV leases on `host` (a pod's IP,
    known only once the pod runs), unless the file names a kv_transfer_host itself. Their
    peers' pod IPs are not known either, so they pull KV from cluster networks
    (`CLUSTER_NETWORKS`) unless the file names kv_peer_hosts."""
    defaults = {"kv_transfer_host": host, "kv_peer_hosts": CLUSTER_NETWORKS}
    pools = tuple(
        replace(p, stub={**defaults, **p.stub}) if p.kind == "stub" and p.server == server else p for p in d.pools
    )
    return replace(d, pools=pools)


def with_kv_peers(d: Deployment) -> Deployment:
    """`d` with every stub engine allowed to pull KV from the hosts its file names as
    kv_transfer_host (besides loopback), unless the file names kv_peer_hosts itself: a
    generation engine connects only to transfer servers the deployment lists."""
    named = sorted({p.stub["kv_transfer_host"] for p in d.pools if p.kind == "stub" and "kv_transfer_host" in p.stub})
    if not named:
        return d  # every engine serves on loopback: the engines' default kv_peer_hosts fits
    peers = ",".join([EngineConfig().kv_peer_hosts, *named])
    pools = tuple(replace(p, stub={"kv_peer_hosts": peers, **p.stub}) if p.kind == "stub" else p for p in d.pools)
    return replace(d, pools=pools)


def _read_env_file(path: Path) -> dict[str, str]:
    """The `NAME=value` lines of a shell environment file (what `. file` would set)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise DeploymentError(f"{path}:{number}: {exc}; fix the line or delete the file") from None
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        name, sep, value = words[0].partition("=")
        if len(words) != 1 or not sep or not name.isidentifier():
            raise DeploymentError(f"{path}:{number}: expected NAME=value, got {line!r}; fix it or delete the file")
        values[name] = value
    return values


def deployment_secrets(out: Path, d: Deployment | None = None) -> dict[str, str]:
    """The secrets every server built into `out` shares, kept in `out/secrets.env` (0600): the
    file's values when it has them (a rebuild must not change them under running servers),
    new random ones for any it lacks."""
    path = out / SECRETS_FILE
    values = _read_env_file(path) if path.exists() else {}
    if values.get(ADMIN_KEY_ENV):
        try:
            check_admin_key(values[ADMIN_KEY_ENV], f"{path}: {ADMIN_KEY_ENV}")
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None
    missing = [name for name in (KV_SECRET_ENV, ADMIN_KEY_ENV) if not values.get(name)]
    if not missing:
        os.chmod(path, 0o600)  # a copy may have come with a looser mode
        return values
    values.update({name: new_secret() for name in missing})
    deployment = f" of deployment {d.name!r}" if d is not None else ""
    lines = [
        f"# Generated by orchestrator/tools/deploy.py: the secrets every server{deployment} shares. The launch",
        "# scripts load it unless the variables are set already. Keep it private; kept on rebuild.",
        *(f"{name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    write_private(path, "\n".join(lines) + "\n")
    return values


def build(d: Deployment, out: Path, only: str | None = None, source: Path = DEFAULT_REPOSITORY) -> dict[str, Path]:
    """Write each server's repository to `out/<server>`, `out/launch-<server>.sh`, and the
    deployment's shared secrets to `out/secrets.env` (kept when it exists)."""
    written: dict[str, Path] = {}
    d = with_kv_peers(d)
    for server in d.servers:
        if only is not None and server.name != only:
            continue
        dest = out / server.name
        dest.mkdir(parents=True, exist_ok=True)
        if server.name == d.frontend:
            for model, spec in _frontend_specs(d).items():
                model_dir = write_model(dest, model, spec, source)
                counts = {"orchestrator": d.orchestrator_instances, "postprocessing": d.postprocessing_instances}
                if model in counts:
                    config = model_dir / "config.pbtxt"
                    config.write_text(set_instance_count(config.read_text(), counts[model]))
        for pool in d.pools:
            if pool.server == server.name:
                for i in range(pool.engines):
                    _write_engine(dest, d, pool, i, source)
        script = out / f"launch-{server.name}.sh"
        script.write_text(launch_script(d, server.name, project=str(REPO_ROOT)))
        script.chmod(0o755)
        written[server.name] = dest
    if only is not None and not written:
        raise DeploymentError(f"--server {only!r}: no such server; defined: {[s.name for s in d.servers]}")
    deployment_secrets(out, d)
    return written


def on_free_ports(d: Deployment) -> Deployment:
    """The same deployment with every server on free loopback ports (endpoints follow):
    for tests and benchmarks, which must not collide with anything already listening."""
    servers = tuple(
        replace(s, host="127.0.0.1", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        for s in d.servers
    )
    return replace(d, servers=servers)


def serve(d: Deployment, out: Path, stack: ExitStack) -> dict[str, TritonServer]:
    """Build `d` into `out` and start every server on its ports, engine servers first (the
    frontend probes them at load), all with the build's secrets (KV handoffs between servers
    need the same KV secret); `stack` stops them all."""
    repos = build(d, out)
    secrets = deployment_secrets(out, d)
    started: dict[str, TritonServer] = {}
    for s in sorted(d.servers, key=lambda s: s.name == d.frontend):
        started[s.name] = stack.enter_context(TritonServer(
            model_repository=repos[s.name], http_port=s.http_port, grpc_port=s.grpc_port, metrics_port=s.metrics_port,
            kv_secret=secrets[KV_SECRET_ENV], admin_key=secrets[ADMIN_KEY_ENV],
        ))  # fmt: skip
    return started


def describe(d: Deployment) -> str:
    lines = [f"deployment {d.name!r}: {'aggregated' if d.aggregated else 'disaggregated'}"]
    for pool in d.pools:
        lines.append(
            f"  {pool.role}: {pool.engines} x {pool.kind} (tp={pool.tensor_parallel} pp={pool.pipeline_parallel}) "
            f"on {pool.server}: {', '.join(pool.names)}"
        )
    for phase, routing in d.routing.items():
        if d.pool(phase) is None:
            continue
        lines.append(f"  routing {phase}: {routing.policy} {dict(routing.knobs) or ''}".rstrip())
    for server in d.servers:
        world = mpi_world_size(d, server.name)
        mpi = f", MPI world {world}" if world else ""
        lines.append(
            f"  server {server.name} {server.host} http {server.http_port} grpc {server.grpc_port} "
            f"metrics {server.metrics_port}{mpi}: {', '.join(d.servers_hosting(server.name))}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a deployment file and print what it describes")
    check.add_argument("file", type=Path)
    cmd = sub.add_parser("build", help="write model repositories and launch scripts")
    cmd.add_argument("file", type=Path)
    cmd.add_argument("--out", type=Path, required=True)
    cmd.add_argument("--server", help="write only this server's repository (what a pod does)")
    cmd.add_argument("--kv-transfer-host", help="with --server: the address its stub engines serve KV on (a pod's IP)")
    k8s = sub.add_parser("k8s", help="write Kubernetes manifests (ConfigMap, Secret, Deployments, Services)")
    k8s.add_argument("file", type=Path)
    k8s.add_argument("--out", type=Path, required=True)
    k8s.add_argument(
        "--validate", action="store_true", help="check them against Kubernetes' schemas (kubernetes-validate)"
    )
    args = parser.parse_args(argv)
    try:
        d = load(args.file)
        if args.command == "check":
            print(describe(d))
        elif args.command == "build":
            if args.kv_transfer_host:
                if not args.server:
                    raise DeploymentError("--kv-transfer-host needs --server: it is one server's own address")
                d = with_kv_transfer_host(d, args.server, args.kv_transfer_host)
            for name, path in build(d, args.out, args.server).items():
                print(f"{name}: {path}  (start: {args.out / f'launch-{name}.sh'})")
            print(f"secrets: {args.out / SECRETS_FILE}  (mode 0600; every server of the deployment needs the same)")
        else:
            write_manifests(d, args.file, args.out, args.validate)
            print(f"wrote {args.out}")
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _dumper() -> type:
    """A YAML dumper for people: no anchors/aliases, multi-line strings as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: object) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return Dumper


def _kept_secrets(d: Deployment, out: Path) -> dict[str, str] | None:
    """The secrets of the deployment's Secret in an earlier `out`, if it has them all: applying a
    regenerated file must not change them under running pods (a restarted pod would read new
    values while its peers keep the old ones)."""
    import yaml

    if not out.exists():
        return None
    try:
        docs = list(yaml.safe_load_all(out.read_text()))
    except yaml.YAMLError:
        return None
    for doc in docs:
        if not isinstance(doc, dict) or (doc.get("kind"), doc.get("metadata", {}).get("name")) != (
            "Secret",
            secret_name(d),
        ):
            continue
        data = doc.get("stringData") or {}
        values = {env: str(data.get(key) or "") for env, key in SECRET_KEYS.items()}
        return values if all(values.values()) else None
    return None


def write_manifests(d: Deployment, file: Path, out: Path, validate: bool) -> list[dict]:
    """Write the manifests to `out` (mode 0600: it holds the Secret). The secrets are new random
    ones, or those of the Secret already in `out`."""
    import yaml

    dumper = _dumper()
    text = yaml.dump(in_cluster_file(d, yaml.safe_load(file.read_text())), Dumper=dumper, sort_keys=False)
    docs = manifests(d, text, _kept_secrets(d, out))
    if validate:
        check_manifests(docs)
    write_private(out, yaml.dump_all(docs, Dumper=dumper, sort_keys=False))
    return docs


def check_manifests(docs: list[dict]) -> None:
    """Validate against the newest bundled Kubernetes schemas, strictly (unknown fields fail)."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            raise DeploymentError(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}") from None


if __name__ == "__main__":
    sys.exit(main())
