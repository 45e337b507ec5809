"""Where an engine lives: a model in this Triton server, or one on another server over gRPC.

    context_0                      a model next to the orchestrator, called by BLS
    grpc://10.0.0.7:8001/context_0 a model on another tritonserver, called over gRPC

The full text is the engine's identity in pools, routing decisions, logs and metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_MODEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    """An engine model on another tritonserver: `grpc://HOST:PORT/MODEL`."""

    host: str
    port: int
    model: str

    @property
    def url(self) -> str:
        """`host:port` as gRPC takes it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"grpc://{self.url}/{self.model}"

    @classmethod
    def parse(cls, text: str) -> "RemoteEndpoint":
        """Raises ValueError saying what is wrong and the expected form."""
        form = "expected grpc://HOST:PORT/MODEL, e.g. grpc://10.0.0.5:8001/generation_0"
        parts = urlsplit(text.strip())
        if parts.scheme != "grpc":
            raise ValueError(f"engine endpoint {text!r} does not start with grpc://; {form}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"engine endpoint {text!r} has user info, a query or a fragment; {form}")
        if not parts.hostname:
            raise ValueError(f"engine endpoint {text!r} has no host; {form}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not port:  # None, out of range or 0
            raise ValueError(f"engine endpoint {text!r} needs a port between 1 and 65535; {form}")
        model = parts.path.removeprefix("/")
        if not model or "/" in model:
            raise ValueError(f"engine endpoint {text!r} must name exactly one model after the port; {form}")
        return cls(host=parts.hostname, port=port, model=model)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # as written in the config
    model: str
    remote_endpoint: RemoteEndpoint | None = None  # None: a model of this server

    @property
    def remote(self) -> bool:
        return self.remote_endpoint is not None

    @property
    def url(self) -> str | None:
        """`host:port` of the remote server; None for a local model."""
        return None if self.remote_endpoint is None else self.remote_endpoint.url


def parse_endpoint(text: str) -> Endpoint:
    """Parse one pool entry; the error says what a valid entry looks like."""
    text = text.strip()
    if "://" in text:
        remote = RemoteEndpoint.parse(text)
        return Endpoint(name=text, model=remote.model, remote_endpoint=remote)
    if not _MODEL.match(text):
        raise ValueError(
            f"engine {text!r} is not a model name (letters, digits, '_', '-', '.') nor grpc://HOST:PORT/MODEL"
        )
    return Endpoint(name=text, model=text)
