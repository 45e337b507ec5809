"""Who may use what: Triton's admin APIs behind a key, and the secrets a deployment shares.

Why: unless told otherwise, Triton serves its model-repository, model-config, shared-memory,
trace and logging APIs to anyone who reaches its ports. Whoever can call them can unload
engines, rewrite log settings, or register a `/dev/shm` region with the server (and through
it read or write our engines' shared-memory KV stores). Triton 2.51 can demand a header for
chosen API groups (`--http-restricted-api`, `--grpc-restricted-protocol`), so every server
we start does, with one key per deployment. Health, metadata, inference and statistics stay
open: clients, load balancers, probes and the orchestrator's engine calls use only those.

What Triton 2.51 does, measured (tests/e2e/test_admin_lock_e2e.py): the flag is
`<api>,<api>:<header>=<value>` (the value is everything after the first `=`); naming one
API in two flags stops the server at start ("can not be specified in multiple config
groups"). A refused HTTP call, with no key or a wrong one, is 403 `This API is restricted,
expecting header 'admin-key'`. Over gRPC Triton prefixes the header: clients send
`triton-grpc-protocol-admin-key`, and a refused call is UNAVAILABLE `This protocol is
restricted, expecting header 'triton-grpc-protocol-admin-key'`.

The secrets travel as environment variables: `DISAGG_ADMIN_KEY` (the admin key) and
`DISAGG_KV_SECRET` (signs KV handoffs between engines; every server of a deployment needs
the same value, see `disagg deploy` (orchestrator/tools/deploy.py) and orchestrator/ops/k8s_manifests.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Sequence

ADMIN_KEY_ENV = "DISAGG_ADMIN_KEY"
KV_SECRET_ENV = "DISAGG_KV_SECRET"
ADMIN_HEADER = "admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # what Triton puts before a gRPC restricted header
GRPC_ADMIN_HEADER = GRPC_HEADER_PREFIX + ADMIN_HEADER
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "trace", "logging")
HTTP_FLAG = "--http-restricted-api"
GRPC_FLAG = "--grpc-restricted-protocol"
MIN_KEY_LENGTH = 16


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe: fits a header, a flag and a shell word)."""
    return secrets.token_urlsafe(32)


def check_admin_key(key: str, source: str = ADMIN_KEY_ENV) -> str:
    """`key` if it can serve as the admin key, else a ValueError naming `source` and the fix.

    It travels in a tritonserver flag, an HTTP header and gRPC metadata: printable ASCII
    without spaces fits all three."""
    bad = sorted({c for c in key if not 0x21 <= ord(c) <= 0x7E})
    if bad:
        raise ValueError(f"{source} holds characters a header cannot carry ({bad!r}): use printable ASCII, no spaces")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{source} is {len(key)} characters long; use at least {MIN_KEY_LENGTH}, e.g. "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


def restriction_flags(value: str, flags: Sequence[str] = (HTTP_FLAG, GRPC_FLAG)) -> list[str]:
    """Flags that put `RESTRICTED_APIS` behind the `admin-key` header with `value` (a key, or
    a shell word such as `"$DISAGG_ADMIN_KEY"` in a generated script), one per protocol flag."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"{flag}={apis}:{ADMIN_HEADER}={value}" for flag in flags]


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given to `flag` in `args`, as `--flag=value` or `--flag value`."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def restricting_flags(args: Sequence[str]) -> list[str]:
    """Which of the restricted-API flags `args` already use (the user's own lock)."""
    return [flag for flag in (HTTP_FLAG, GRPC_FLAG) if any(a == flag or a.startswith(flag + "=") for a in args)]


def required_header(args: Sequence[str], flag: str, api: str = "model-repository") -> tuple[str, str] | None:
    """(header, value) that a tritonserver started with `args` wants for `api` over the protocol
    of `flag`, or None when `api` is open there. gRPC headers carry Triton's prefix."""
    for spec in _flag_values(args, flag):
        apis, _, pair = spec.partition(":")
        header, _, value = pair.partition("=")
        if api in apis.split(","):
            return (GRPC_HEADER_PREFIX + header if flag == GRPC_FLAG else header), value
    return None


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), replacing any old file whole:
    a reader never sees half a secret, and an old file's looser mode does not carry over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
