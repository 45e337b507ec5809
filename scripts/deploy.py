"""One deployment file -> validated model repositories, launch scripts, Kubernetes manifests.

    python scripts/deploy.py check deployments/default.yaml          # validate, print the plan
    python scripts/deploy.py build deployments/three-server.yaml --out /srv/disagg
        # -> /srv/disagg/{frontend,context,generation}/ and launch-<server>.sh for each
    python scripts/deploy.py k8s deployments/three-server.yaml --out disagg.yaml --validate

The file format is in the README ("Deployments"); every error names the key at fault.
Stub engines' configs are derived from the committed `model_repository/` (the version
folders link to its code); `tensorrtllm` engines get the real backend's config.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.deployment import Deployment, DeploymentError, Pool, load, mpi_world_size
from orchestrator.k8s_manifests import in_cluster_file, manifests
from orchestrator.launch_plan import launch_script
from orchestrator.trtllm_config import tensorrt_llm_config
from scripts.launch import TritonServer, free_port
from scripts.repository import (
    DEFAULT_REPOSITORY,
    REPO_ROOT,
    FRONTEND_MODELS,
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
    stub_config = source / _STUB_SOURCE[pool.role]
    if pool.kind == "stub":
        model_dir = write_model(dest, name, ModelSpec(_STUB_SOURCE[pool.role], pool.stub), source)
        config = model_dir / "config.pbtxt"
        config.write_text(set_max_batch_size(config.read_text(), pool.max_batch_size))
        return
    model_dir = dest / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # the backend needs a version folder, empty
    text = tensorrt_llm_config(name, pool, pool.real[index], d.tokenizer_dir, (stub_config / "config.pbtxt").read_text())
    (model_dir / "config.pbtxt").write_text(text)


def with_kv_transfer_host(d: Deployment, server: str, host: str) -> Deployment:
    """`d` with the stub engines of `server` serving their KV leases on `host` (a pod's IP,
    known only once the pod runs), unless the file names a kv_transfer_host itself."""
    pools = tuple(
        replace(p, stub={**p.stub, "kv_transfer_host": p.stub.get("kv_transfer_host", host)})
        if p.kind == "stub" and p.server == server and "kv_transfer_host" not in p.stub
        else p
        for p in d.pools
    )
    return replace(d, pools=pools)


def build(d: Deployment, out: Path, only: str | None = None, source: Path = DEFAULT_REPOSITORY) -> dict[str, Path]:
    """Write each server's repository to `out/<server>` and `out/launch-<server>.sh`."""
    written: dict[str, Path] = {}
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
    return written


def on_free_ports(d: Deployment) -> Deployment:
    """The same deployment with every server on free loopback ports (endpoints follow):
    for tests and benchmarks, which must not collide with anything already listening."""
    servers = tuple(
        replace(s, host="127.0.0.1", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) for s in d.servers
    )
    return replace(d, servers=servers)


def serve(d: Deployment, out: Path, stack: ExitStack) -> dict[str, TritonServer]:
    """Build `d` into `out` and start every server on its ports, engine servers first (the
    frontend probes them at load); `stack` stops them all."""
    repos = build(d, out)
    started: dict[str, TritonServer] = {}
    for s in sorted(d.servers, key=lambda s: s.name == d.frontend):
        started[s.name] = stack.enter_context(TritonServer(
            model_repository=repos[s.name], http_port=s.http_port, grpc_port=s.grpc_port, metrics_port=s.metrics_port,
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
    k8s = sub.add_parser("k8s", help="write Kubernetes manifests (ConfigMap, Deployments, Services)")
    k8s.add_argument("file", type=Path)
    k8s.add_argument("--out", type=Path, required=True)
    k8s.add_argument("--validate", action="store_true", help="check them against Kubernetes' schemas (kubernetes-validate)")
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


def write_manifests(d: Deployment, file: Path, out: Path, validate: bool) -> list[dict]:
    import yaml

    dumper = _dumper()
    text = yaml.dump(in_cluster_file(d, yaml.safe_load(file.read_text())), Dumper=dumper, sort_keys=False)
    docs = manifests(d, text)
    if validate:
        check_manifests(docs)
    out.write_text(yaml.dump_all(docs, Dumper=dumper, sort_keys=False))
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
