"""The gRPC address of the tritonserver this model runs in, read from its command line.

The orchestrator reaches its own server's generation engines over loopback gRPC (see
`orchestrator.clients.dispatch`), and the python backend tells a model nothing about the server's
ports. A python-backend stub is a child process of tritonserver, so the server's flags
are in `/proc/<parent>/cmdline`: `--grpc-port` (Triton's default 8001),
`--grpc-address` (a wildcard address is reached on loopback) and `--allow-grpc`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

DEFAULT_GRPC_PORT = 8001
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def _flags(argv: Sequence[str]) -> dict[str, str]:
    """`--key=value` and `--key value` forms; a later flag wins, as in tritonserver."""
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        flags[key] = value
    return flags


def grpc_address_from_argv(argv: Sequence[str]) -> str:
    """`HOST:PORT` to reach the server started with `argv` over gRPC from the same host.

    Raises ValueError when that server does not serve gRPC."""
    flags = _flags(argv)
    if flags.get("allow-grpc", "true").lower() in ("false", "0", "no"):
        raise ValueError("the server runs with --allow-grpc=false")
    host = flags.get("grpc-address", "")
    host = "127.0.0.1" if host in _WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = flags.get("grpc-port", str(DEFAULT_GRPC_PORT))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the server's --grpc-port is {port!r}")
    return f"{host}:{port}"


def server_grpc_address(pid: int | None = None) -> str:
    """The gRPC `HOST:PORT` of the process `pid` (default: this process's parent, the server)."""
    pid = os.getppid() if pid is None else pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return grpc_address_from_argv([a for a in argv if a])


def loopback_address(streams_over: str, configured: str) -> str:
    """Where `EndpointClient` sends many-response streams to local engines: "" (BLS) unless
    `streams_over` is grpc; then `configured`, else the server's own address. Errors name
    the orchestrator parameters to set."""
    if streams_over != "grpc":
        return ""
    if configured:
        return configured
    try:
        return server_grpc_address()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"orchestrator parameter 'streams_over'='grpc' needs this server's gRPC endpoint ({exc}): "
            "set 'self_grpc_address' to its HOST:PORT, or 'streams_over' to 'bls'"
        ) from None
