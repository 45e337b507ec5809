"""Where an engine lives: a model in this Triton server, or one on another server over gRPC.

    context_0                      a model next to the orchestrator, called by BLS
    grpc://10.0.0.7:8001/context_0 a model on another tritonserver, called over gRPC

The full text is the engine's identity in pools, routing decisions, logs and metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MODEL = re.compile(r"^[A-Za-z0-9_.\-]+$")
_REMOTE = re.compile(r"^grpc://(?P<host>\[[0-9A-Fa-f:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/(?P<model>[^/]+)$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # as written in the config
    model: str
    url: str | None = None  # "host:port" of a remote server; None for a local model

    @property
    def remote(self) -> bool:
        return self.url is not None


def parse_endpoint(text: str) -> Endpoint:
    """Parse one pool entry; the error says what a valid entry looks like."""
    text = text.strip()
    if text.startswith("grpc://"):
        match = _REMOTE.match(text)
        if match is None or not 0 < int(match["port"]) < 65536 or not _MODEL.match(match["model"]):
            raise ValueError(f"engine {text!r} is not a valid remote engine; write grpc://HOST:PORT/MODEL, e.g. grpc://10.0.0.7:8001/context_0")
        return Endpoint(name=text, model=match["model"], url=f"{match['host']}:{match['port']}")
    if "://" in text:
        raise ValueError(f"engine {text!r}: only grpc:// remote engines are supported")
    if not _MODEL.match(text):
        raise ValueError(f"engine {text!r} is not a model name (letters, digits, '_', '-', '.')")
    return Endpoint(name=text, model=text)
