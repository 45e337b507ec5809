"""The orchestrator's configuration, parsed once at model load (config.pbtxt `parameters`).

Pools (each entry is an engine model in this Triton server, `context_0`, or one on another
server, `grpc://host:port/context_0`):
- `context_engines`, `generation_engines`: comma-separated (required unless `pool_file`
  supplies them). An empty `context_engines` means aggregated serving: every request runs
  both phases on a generation-pool engine (no `request_type`), as an in-flight batching
  baseline behind the same ensemble.
- `pool_file` (""): a JSON file `{"context_engines": [...], "generation_engines": [...]}`,
  relative to the orchestrator's model directory or absolute. When set it is the
  membership: read at load (must exist and be valid), re-read when it changes
  (`pool_poll_s`, 1.0), so engines join and leave without a restart.

Routing (`orchestrator.routing.policies`):
- `context_policy`, `generation_policy` (round_robin): round_robin, least_loaded,
  kv_aware, power_of_two, random.
- `routing_seed` (0): seeds power_of_two and random.
- `kv_weight` (1.0): kv_aware's price of one uncached prompt block, in in-flight blocks.
- `load_metric` (requests): least_loaded / power_of_two count requests or tokens.
- `tokens_per_block` (32): the engines' KV block size, for the router's block hashes.
- `prefix_index_blocks` (4096): blocks the router remembers per engine.
- `log_routing` (false): log every decision (phase, policy, engine, matched blocks).
- `log_requests` (false), `log_requests_per_s` (10): one INFO line per finished request
  (id, engines, phase times, outcome), at most that many a second (the rest are counted).

Conditional disaggregation (both off at 0): the whole request goes to the generation
engine, skipping the context hop, when
- `local_prefill_max_tokens`: its prompt tokens not cached on the chosen generation
  engine are at most this many, or
- `context_queue_threshold`: every eligible context engine already has at least this
  many context phases in flight.

Transport (`orchestrator.clients.dispatch`):
- `streams_over` (grpc): how child requests that answer with many responses (streaming
  generation) reach engines of this server: `grpc` over this server's own gRPC endpoint
  on loopback, `bls` by BLS. Triton's python backend can deadlock the orchestrator's
  stub when such streams travel over BLS (README: "The BLS stub crash"); context phases,
  non-streaming requests and stops use BLS either way.
- `self_grpc_address` (""): this server's gRPC `HOST:PORT` for `streams_over: grpc`;
  "" reads it from the server's command line (`orchestrator.runtime.self_endpoint`).
- `stuck_exit_s` (30): a model event loop that has not run for this long ends its stub
  process (exit status 1), which the supervisor restarts (`orchestrator.runtime.watchdog`); 0: never.

Failures (`orchestrator.routing.health`):
- `max_retries` (2): further engines tried per phase after a failure.
- `max_migrations` (1): how often a streaming request whose generation engine failed after
  tokens reached the client is continued on other engines (a context phase over prompt +
  the tokens so far, then generation elsewhere); 0: it ends UNAVAILABLE at once.
- `engine_timeout_s` (60): the longest wait for one reply of an engine.
- `next_reply_timeout_s` (10): the longest wait for an engine's next reply once its stream
  has sent one (a decode step, not a prefill or a queue); past it the engine has failed.
  Triton 2.51 (up to 25.03) loses a decoupled BLS child's error response that follows
  streamed responses, so this bound is what notices a generation engine that failed
  mid-stream over BLS (and migrates the request). 0: `engine_timeout_s` throughout.
- `breaker_failures` (1), `breaker_backoff_s` (1.0), `breaker_backoff_max_s` (30):
  consecutive failures that mark an engine unhealthy, and how long it is skipped (doubling).
- `health_check_s` (2.0): how often engines' readiness is probed (0: never).

Load (`orchestrator.serving.pipeline`):
- `max_in_flight` (1024; 0: unlimited): requests this orchestrator instance serves at once
  (each instance process has its own count). One more gets `UNAVAILABLE: overloaded: ...`
  at once, before it reaches an engine, instead of queueing; `stop=true` is never refused.
  The committed pools take 2 engines x (64 running + 512 queued, `max_queued_requests`)
  = 1152 requests per phase, 9x what they run at once: with one instance the refusal comes
  here, before any prefill is spent, and engines' own bound is the backstop for several.

Ending requests (`orchestrator.serving.pipeline`; 0 turns a timeout off):
- `request_timeout_s` (0): a request's deadline from arrival; past it the client gets
  UNAVAILABLE and engines are told to drop its work.
- `context_timeout_s`, `generation_timeout_s` (0): the longest one attempt of a phase may
  take; an overrun counts as the engine's failure (retried like one).
- `cancel_check_ms` (100), `cancel_checks_per_tick` (32): clients' Triton cancellations
  are polled every interval, for at most that many requests in turn (each poll is a
  50-90 us IPC round trip in the python backend; 32 keep it under 3% of the loop).
- `stop_timeout_s` (5): how long a `stop=true` sent to an engine may take to be answered.

Every error names the key and says what to write instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from orchestrator.clients.endpoints import parse_endpoint
from orchestrator.routing.health import BreakerSettings
from orchestrator.routing.policies import POLICIES, PolicyOptions
from orchestrator.wire.params import typed_values


def _engine_list(raw: Any, key: str) -> tuple[str, ...]:
    """A pool from a comma-separated string or a JSON list; every entry must parse.

    Only the context pool may be empty: then every request runs whole (both phases) on a
    generation-pool engine, which is aggregated serving behind the same orchestrator.
    """
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(n, str) for n in items):
        raise ValueError(f"'{key}' must be a list of engine names, got {raw!r}")
    names = tuple(n.strip() for n in items if n.strip())
    if not names and key != "context_engines":
        raise ValueError(f"'{key}' must list at least one engine model, e.g. 'context_0,context_1'")
    if len(set(names)) != len(names):
        raise ValueError(f"'{key}' lists an engine twice: {raw!r}")
    for name in names:
        try:
            parse_endpoint(name)
        except ValueError as exc:
            raise ValueError(f"'{key}': {exc}") from None
    return names


@dataclass(frozen=True, slots=True)
class Pools:
    """Pool membership: the only part of the config that may change while serving."""

    context_engines: tuple[str, ...]
    generation_engines: tuple[str, ...]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> "Pools":
        try:
            if "context_engines" not in data:  # empty is aggregated serving; absent is an oversight
                raise ValueError(
                    "'context_engines' is missing: list the context engines, or set it to '' for aggregated serving"
                )
            return cls(
                context_engines=_engine_list(data.get("context_engines", ""), "context_engines"),
                generation_engines=_engine_list(data.get("generation_engines", ""), "generation_engines"),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> "Pools":
        """Read a pool file; errors name the file and what is wrong in it."""
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"pool_file {path}: cannot read it ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"pool_file {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f'pool_file {path}: must hold an object {{"context_engines": [...], "generation_engines": [...]}}'
            )
        return cls.from_mapping(data, f"pool_file {path}")


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    context_engines: tuple[str, ...] = ()
    generation_engines: tuple[str, ...] = ()
    pool_file: str = ""
    pool_poll_s: float = 1.0
    context_policy: str = "round_robin"
    generation_policy: str = "round_robin"
    routing_seed: int = 0
    kv_weight: float = 1.0
    load_metric: str = "requests"
    tokens_per_block: int = 32
    prefix_index_blocks: int = 4096
    log_routing: bool = False
    log_requests: bool = False
    log_requests_per_s: float = 10.0
    local_prefill_max_tokens: int = 0
    context_queue_threshold: int = 0
    streams_over: str = "grpc"
    self_grpc_address: str = ""
    stuck_exit_s: float = 30.0
    max_retries: int = 2
    max_migrations: int = 1
    engine_timeout_s: float = 60.0
    next_reply_timeout_s: float = 10.0
    breaker_failures: int = 1
    breaker_backoff_s: float = 1.0
    breaker_backoff_max_s: float = 30.0
    health_check_s: float = 2.0
    request_timeout_s: float = 0.0
    context_timeout_s: float = 0.0
    generation_timeout_s: float = 0.0
    cancel_check_ms: float = 100.0
    cancel_checks_per_tick: int = 32
    stop_timeout_s: float = 5.0
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        _engine_list(list(self.context_engines), "context_engines")
        _engine_list(list(self.generation_engines), "generation_engines")
        for key in ("context_policy", "generation_policy"):
            if getattr(self, key) not in POLICIES:
                raise ValueError(
                    f"orchestrator parameter '{key}': unknown policy {getattr(self, key)!r}; choose one of {sorted(POLICIES)}"
                )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and not value >= 0:
                raise ValueError(f"orchestrator parameter '{f.name}' must be >= 0, got {value}")
        for key in ("tokens_per_block", "prefix_index_blocks", "breaker_failures", "cancel_checks_per_tick"):
            if getattr(self, key) < 1:
                raise ValueError(f"orchestrator parameter '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("engine_timeout_s", "breaker_backoff_s", "pool_poll_s", "stop_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"orchestrator parameter '{key}' must be > 0, got {getattr(self, key)}")
        if self.streams_over not in ("grpc", "bls"):
            raise ValueError(
                f"orchestrator parameter 'streams_over' must be 'grpc' or 'bls', got {self.streams_over!r}"
            )
        if self.breaker_backoff_max_s < self.breaker_backoff_s:
            raise ValueError("orchestrator parameter 'breaker_backoff_max_s' must be >= breaker_backoff_s")
        try:
            _ = self.policy_options  # validates the policy knobs now, not at the first request
        except ValueError as exc:
            raise ValueError(f"orchestrator parameter {exc}") from None

    @property
    def next_reply_s(self) -> float:
        """The wait for each reply after a stream's first one."""
        if self.next_reply_timeout_s <= 0:
            return self.engine_timeout_s
        return min(self.engine_timeout_s, self.next_reply_timeout_s)

    @property
    def pools(self) -> Pools:
        return Pools(self.context_engines, self.generation_engines)

    @property
    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(seed=self.routing_seed, kv_weight=self.kv_weight, load_metric=self.load_metric)

    @property
    def breaker(self) -> BreakerSettings:
        return BreakerSettings(self.breaker_failures, self.breaker_backoff_s, self.breaker_backoff_max_s)

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model_dir: Path | None = None) -> "OrchestratorConfig":
        """Parse config.pbtxt parameters; with `pool_file`, the file supplies the pools."""
        values = typed_values(cls, {k: v for k, v in params.items() if not k.endswith("_engines")}, "orchestrator")
        pool_file = values.get("pool_file", "")
        if pool_file:
            path = Path(pool_file)
            if not path.is_absolute() and model_dir is not None:
                path = model_dir / path
            values["pool_file"] = str(path)
            try:
                pools = Pools.from_file(path)
            except ValueError as exc:
                raise ValueError(f"orchestrator parameter {exc}") from None
        else:
            pools = Pools.from_mapping(params, "orchestrator parameter")
        return cls(context_engines=pools.context_engines, generation_engines=pools.generation_engines, **values)
