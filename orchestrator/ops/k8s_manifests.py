"""Kubernetes manifests for a deployment: one Deployment + Service per server, one ConfigMap,
one Secret.

The ConfigMap carries the deployment file itself, with each server's host replaced by its
Service name, so every pod builds its own model repository at start-up
(`disagg deploy build --server NAME`) from the same file the user wrote; nothing is
generated twice or copied by hand. Pods are ready when Triton's `/v2/health/ready` says
so (every model loaded). The frontend is alive while a one-token request through the
ensemble succeeds (Triton's own liveness stays green when a python stub has died);
engine servers while `/v2/health/live` answers. Stub engines serve their KV leases on
the pod's IP (`--kv-transfer-host "$POD_IP"`, from the downward API). A pod with real engines
requests one GPU per distinct `gpu_device_ids` entry of its server.

The Secret holds what every server must share (orchestrator/ops/access.py): `kv-secret` (signs
KV handoffs between engines) and `admin-key` (locks Triton's admin APIs); every container
gets them as `DISAGG_KV_SECRET` and `DISAGG_ADMIN_KEY`, which its launch script prefers over
the `secrets.env` its own build wrote.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from orchestrator.ops.access import ADMIN_KEY_ENV, KV_SECRET_ENV, new_secret
from orchestrator.ops.deployment import Deployment, Server

CONFIG_PATH = "/etc/disagg"
# Each secret's environment variable and its key in the Secret.
SECRET_KEYS = {KV_SECRET_ENV: "kv-secret", ADMIN_KEY_ENV: "admin-key"}


def service_name(d: Deployment, server: str) -> str:
    return f"{d.name}-{server}"


def secret_name(d: Deployment) -> str:
    return f"{d.name}-secrets"


def in_cluster_file(d: Deployment, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The user's file with every server's host set to its Service's DNS name."""
    data = copy.deepcopy(dict(raw))
    servers = data.get("servers")
    if servers:
        for name in servers:
            servers[name] = {**(servers[name] or {}), "host": service_name(d, name)}
    return data


def _gpus(d: Deployment, server: str) -> int:
    return len({gpu for p in d.pools if p.server == server for e in p.real for gpu in e.gpu_device_ids})


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


# A one-token request through the ensemble. Triton 2.51 keeps reporting live and ready after
# a python model's stub process died (then every request fails "Stub process ... is not
# healthy" and the stub is never restarted), so the frontend's liveness is a real request.
_GENERATE = (
    "import json,sys,urllib.request as u;"
    "r=u.Request('http://127.0.0.1:{port}/v2/models/ensemble/generate',"
    "data=json.dumps({{'text_input':'ping','max_tokens':1}}).encode(),headers={{'Content-Type':'application/json'}});"
    "sys.exit(0 if 'text_output' in json.load(u.urlopen(r,timeout=8)) else 1)"
)


def _generate_probe(http_port: int) -> dict[str, Any]:
    return {
        "exec": {"command": ["python3", "-c", _GENERATE.format(port=http_port)]},
        "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 3,
    }  # fmt: skip


def manifests(d: Deployment, file_text: str, secrets: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """ConfigMap, Secret, then a Deployment and a Service for each server. `secrets` maps
    DISAGG_KV_SECRET and DISAGG_ADMIN_KEY to their values; None: new random ones."""
    labels = {"app.kubernetes.io/part-of": d.name}
    out = _shared(d, file_text, secrets, labels)
    for server in d.servers:
        name = service_name(d, server.name)
        selector = {**labels, "app.kubernetes.io/name": name}
        container = _container(d, server)
        out.append(_deployment(d, name, selector, container))
        out.append(_service(d, name, selector, container))
    return out


def _shared(
    d: Deployment, file_text: str, secrets: Mapping[str, str] | None, labels: dict[str, str]
) -> list[dict[str, Any]]:
    """What every server's pod reads: the deployment file (ConfigMap) and the shared secrets."""
    k = d.kubernetes
    values = {env: (secrets or {}).get(env) or new_secret() for env in SECRET_KEYS}
    return [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{d.name}-deployment", "namespace": k.namespace, "labels": labels},
        "data": {"deployment.yaml": file_text},
    }, {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": secret_name(d), "namespace": k.namespace, "labels": labels},
        "stringData": {key: values[env] for env, key in SECRET_KEYS.items()},
    }]  # fmt: skip


def _container(d: Deployment, server: Server) -> dict[str, Any]:
    """The tritonserver container of one server: builds its repository from the ConfigMap, then
    launches; probes, ports, the secrets as environment variables, GPUs for real engines."""
    k = d.kubernetes
    secret_env = [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": secret_name(d), "key": key}}}
        for env, key in SECRET_KEYS.items()
    ]
    build = (
        f"PYTHONPATH={k.project_dir} python3 -m orchestrator.tools.deploy build {CONFIG_PATH}/deployment.yaml "
        f'--server {server.name} --kv-transfer-host "$POD_IP" --out /models '
        f"&& exec bash /models/launch-{server.name}.sh"
    )
    container: dict[str, Any] = {
        "name": "tritonserver",
        "image": k.image,
        "command": ["bash", "-c", build],
        # stub engines serve KV leases on the pod's own address (known only at run time)
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, *secret_env],
        "ports": [
            {"name": "http", "containerPort": server.http_port},
            {"name": "grpc", "containerPort": server.grpc_port},
            {"name": "metrics", "containerPort": server.metrics_port},
        ],
        "readinessProbe": _probe("/v2/health/ready", "http", 5, 3),
        "livenessProbe": _generate_probe(server.http_port)
        if server.name == d.frontend
        else _probe("/v2/health/live", "http", 10, 3),
        "startupProbe": _probe("/v2/health/live", "http", 10, 60),  # engines may take minutes to load
        "volumeMounts": [
            {"name": "deployment", "mountPath": CONFIG_PATH, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],  # fmt: skip
    }
    gpus = _gpus(d, server.name)
    if gpus:
        container["resources"] = {"limits": {k.gpu_resource: gpus}}
    return container


def _deployment(d: Deployment, name: str, selector: dict[str, str], container: dict[str, Any]) -> dict[str, Any]:
    """One server's Kubernetes Deployment: one replica of its container."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": d.kubernetes.namespace, "labels": selector},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "deployment", "configMap": {"name": f"{d.name}-deployment"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},  # python backend + KV shm
                    ],
                },
            },
        },
    }  # fmt: skip


def _service(d: Deployment, name: str, selector: dict[str, str], container: dict[str, Any]) -> dict[str, Any]:
    """One server's Service: its container's ports under its stable DNS name."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": d.kubernetes.namespace, "labels": selector},
        "spec": {"selector": selector, "ports": [
            {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in container["ports"]
        ]},
    }  # fmt: skip
