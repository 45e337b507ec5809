"""The orchestrator's configuration, parsed once at model load.

Keys (config.pbtxt `parameters`, string values):

- `context_engines`: comma-separated engine model names of the context pool (required).
- `generation_engines`: comma-separated engine model names of the generation pool (required).
- `context_policy`, `generation_policy`: routing policy names (default `round_robin`).

Every error names the key and says what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from orchestrator.routing import POLICIES


def _engine_list(params: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = params.get(key, "")
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ValueError(f"orchestrator parameter '{key}' must list at least one engine model, e.g. 'context_0,context_1'")
    if len(set(names)) != len(names):
        raise ValueError(f"orchestrator parameter '{key}' lists an engine twice: {raw!r}")
    return names


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    context_engines: tuple[str, ...]
    generation_engines: tuple[str, ...]
    context_policy: str = "round_robin"
    generation_policy: str = "round_robin"

    def __post_init__(self) -> None:
        for key in ("context_policy", "generation_policy"):
            if getattr(self, key) not in POLICIES:
                raise ValueError(f"orchestrator parameter '{key}': unknown policy {getattr(self, key)!r}; choose one of {sorted(POLICIES)}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "OrchestratorConfig":
        return cls(
            context_engines=_engine_list(params, "context_engines"),
            generation_engines=_engine_list(params, "generation_engines"),
            context_policy=params.get("context_policy", "round_robin").strip(),
            generation_policy=params.get("generation_policy", "round_robin").strip(),
        )
