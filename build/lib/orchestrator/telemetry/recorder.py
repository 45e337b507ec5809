"""What the orchestrator and the engines measure, and the one log line per request.

Metric families (all prefixed `disagg_`; times in seconds; see the README's "Metrics"):

orchestrator (one observation per request, recorded when it ends):
- `request_ttft_seconds{path,engine,streaming}`: arrival -> first token sent to the client
  (`engine`: the context engine, or the generation engine on the local path);
- `request_tpot_seconds{engine,streaming}`: mean gap between output tokens after the first;
- `request_e2e_seconds{path,streaming}`: arrival -> final response;
- `phase_seconds{phase,engine}`: one phase as the orchestrator saw it (context: request sent
  -> first token back; generation: request sent -> last reply; local: both phases);
- `requests_total{outcome,streaming}`: ok, stopped, cancelled, timed_out, overloaded, or
  the error code (unavailable, invalid_arg, ...);
- `routing_decisions_total{phase,policy,engine}`, `routing_retries_total{phase}`,
  `routing_local_total{reason}`, `routing_disaggregated_total`;
- `orchestrator_migrations_total{engine,outcome}`: requests continued on other engines after
  their generation engine (`engine`) failed mid-stream, by how the request then ended.
- `orchestrator_rejected_total{reason}`: requests refused for load with `overloaded`:
  `overloaded` at arrival (this instance's `max_in_flight`), `engines_overloaded` after
  every engine tried was full (their `max_queued_requests`).

engines (stub engines; a real TensorRT-LLM engine reports its own):
- `engine_queue_seconds{engine,phase}`: arrival -> first scheduled;
- `engine_kv_transfer_seconds{engine}`, `engine_kv_transfer_bytes{engine}`: each KV pull;
- `engine_prefix_hit_blocks_total{engine}`, `engine_new_blocks_total{engine}`: prefix reuse;
- `engine_rejected_total{engine,reason}`: requests refused at once (`overloaded`:
  `max_queued_requests` were already waiting for admission);
- gauges from `EngineCore.state()` / `Orchestrator.state()` (see `gauges.py`).

Recording only appends to a list; `flush()` (the model's background task, every 100 ms)
hands the values to the registry, so the IPC cost of Triton's metrics API stays off the
request path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from orchestrator.telemetry.registry import BYTE_BUCKETS, TIME_BUCKETS, MetricSpec, Registry

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "disagg_request_ttft_seconds", "histogram", "time to first token, arrival to the first token sent", TIME_BUCKETS
    ),
    MetricSpec("disagg_request_tpot_seconds", "histogram", "mean time per output token after the first", TIME_BUCKETS),
    MetricSpec("disagg_request_e2e_seconds", "histogram", "arrival to the final response", TIME_BUCKETS),
    MetricSpec(
        "disagg_phase_seconds", "histogram", "one phase on one engine, as the orchestrator saw it", TIME_BUCKETS
    ),
    MetricSpec("disagg_requests_total", "counter", "requests by how they ended"),
    MetricSpec("disagg_routing_decisions_total", "counter", "engines chosen, per phase and policy"),
    MetricSpec("disagg_routing_retries_total", "counter", "phase attempts retried on another engine"),
    MetricSpec("disagg_routing_local_total", "counter", "requests served without the context hop, by reason"),
    MetricSpec("disagg_routing_disaggregated_total", "counter", "requests served by a context and a generation engine"),
    MetricSpec("disagg_orchestrator_migrations_total", "counter", "requests moved off a generation engine mid-stream"),
    MetricSpec(
        "disagg_orchestrator_stops_total",
        "counter",
        "stop=true requests: where handled, whether the id was in flight there",
    ),
    MetricSpec(
        "disagg_orchestrator_rejected_total", "counter", "requests refused for load (overloaded), by which bound"
    ),
)
ENGINE_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("disagg_engine_queue_seconds", "histogram", "arrival to first scheduled on the engine", TIME_BUCKETS),
    MetricSpec("disagg_engine_kv_transfer_seconds", "histogram", "one KV pull, start to blocks written", TIME_BUCKETS),
    MetricSpec("disagg_engine_kv_transfer_bytes", "histogram", "bytes of one KV pull", BYTE_BUCKETS),
    MetricSpec("disagg_engine_prefix_hit_blocks_total", "counter", "prompt blocks found in the prefix cache"),
    MetricSpec("disagg_engine_new_blocks_total", "counter", "prompt blocks that had to be computed or pulled"),
    MetricSpec(
        "disagg_engine_rejected_total", "counter", "requests refused at once (overloaded: the admission queue is full)"
    ),
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request, as the orchestrator saw it (wall-clock ns, 0 = did not happen)."""

    request_id: str
    streaming: bool
    outcome: str
    path: str  # "disaggregated" or "local" ("" if it never got routed)
    context_engine: str
    generation_engine: str
    prompt_tokens: int
    output_tokens: int
    retries: int
    arrival_ns: int
    context_sent_ns: int
    context_done_ns: int
    generation_sent_ns: int
    first_token_ns: int
    last_token_ns: int
    end_ns: int
    migrations: tuple[str, ...] = ()  # the generation engines that failed mid-stream, in order

    @property
    def ttft_s(self) -> float | None:
        return (self.first_token_ns - self.arrival_ns) / 1e9 if self.first_token_ns else None

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2 or not self.first_token_ns or not self.last_token_ns:
            return None
        return (self.last_token_ns - self.first_token_ns) / 1e9 / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return (self.end_ns - self.arrival_ns) / 1e9

    @property
    def context_s(self) -> float | None:
        if not (self.context_sent_ns and self.context_done_ns):
            return None
        return (self.context_done_ns - self.context_sent_ns) / 1e9

    @property
    def generation_s(self) -> float | None:
        return (self.end_ns - self.generation_sent_ns) / 1e9 if self.generation_sent_ns else None

    def log_line(self) -> str:
        """key=value, one line, the same keys every time (grep- and parser-friendly)."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.1f}"

        return (
            f"request id={self.request_id or '-'} outcome={self.outcome} path={self.path or '-'} "
            f"context={self.context_engine or '-'} generation={self.generation_engine or '-'} "
            f"streaming={str(self.streaming).lower()} prompt_tokens={self.prompt_tokens} "
            f"output_tokens={self.output_tokens} retries={self.retries} migrations={len(self.migrations)} "
            f"ttft_ms={ms(self.ttft_s)} "
            f"context_ms={ms(self.context_s)} generation_ms={ms(self.generation_s)} "
            f"tpot_ms={ms(self.tpot_s)} e2e_ms={ms(self.e2e_s)}"
        )


class RateLimitedLog:
    """At most `per_s` lines a second (a token bucket); the rest are counted, then summarised."""

    def __init__(self, log: Callable[[str], None], per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.per_s, self.clock = log, per_s, clock
        self._tokens = per_s
        self._last = clock()
        self.suppressed = 0

    def __call__(self, line: str) -> None:
        now = self.clock()
        self._tokens = min(self.per_s, self._tokens + (now - self._last) * self.per_s)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            self.log(f"({self.suppressed} request lines suppressed above log_requests_per_s={self.per_s:g})")
            self.suppressed = 0
        self.log(line)


Op = tuple[str, str, dict[str, str], float]  # (inc | observe, name, labels, value)


class Telemetry:
    """Buffers metric updates made on the request path; `flush()` sends them to the registry."""

    def __init__(
        self, registry: Registry, request_log: Callable[[str], None] | None = None, deferred: bool = True
    ) -> None:
        """`deferred`: buffer until flush() (Triton: a background task flushes); otherwise apply at once."""
        self.registry = registry
        self.request_log = request_log
        self.deferred = deferred
        self._pending: list[Op] = []

    def inc(self, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        if self.deferred:
            self._pending.append(("inc", name, labels, amount))
        else:
            self.registry.inc(name, labels, amount)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        if self.deferred:
            self._pending.append(("observe", name, labels, value))
        else:
            self.registry.observe(name, labels, value)

    def route(self, phase: str, policy: str, engine: str, attempt: int) -> None:
        self.inc("disagg_routing_decisions_total", {"phase": phase, "policy": policy, "engine": engine})
        if attempt:
            self.inc("disagg_routing_retries_total", {"phase": phase})

    def path(self, local_reason: str | None) -> None:
        if local_reason is None:
            self.inc("disagg_routing_disaggregated_total", {})
        else:
            self.inc("disagg_routing_local_total", {"reason": local_reason})

    def stop(self, where: str, found: bool) -> None:
        """A stop request handled `here` (from a client), `forwarded` to sibling instances (not
        held here), or `from_sibling` (forwarded by a sibling); `found`: the id ran here."""
        self.inc("disagg_orchestrator_stops_total", {"where": where, "found": str(found).lower()})

    def rejected(self, reason: str, record: RequestRecord | None = None) -> None:
        """A request refused for load: `overloaded` (this instance's max_in_flight) or
        `engines_overloaded` (every engine tried was full). `record`: one refused at arrival,
        which ends here: counted by outcome and logged like any request, but with no latency
        observations (it did no work; its zeros would only drag the histograms down)."""
        self.inc("disagg_orchestrator_rejected_total", {"reason": reason})
        if record is not None:
            self.inc("disagg_requests_total", {"outcome": record.outcome, "streaming": str(record.streaming).lower()})
            if self.request_log is not None:
                self.request_log(record.log_line())

    def flush(self) -> int:
        """Apply what was recorded since the last flush; returns how many updates."""
        ops, self._pending = self._pending, []
        for kind, name, labels, value in ops:
            if kind == "inc":
                self.registry.inc(name, labels, value)
            else:
                self.registry.observe(name, labels, value)
        return len(ops)

    def request_done(self, record: RequestRecord) -> None:
        streaming = str(record.streaming).lower()
        self.inc("disagg_requests_total", {"outcome": record.outcome, "streaming": streaming})
        for engine in record.migrations:
            self.inc("disagg_orchestrator_migrations_total", {"engine": engine, "outcome": record.outcome})
        self.observe(
            "disagg_request_e2e_seconds", {"path": record.path or "none", "streaming": streaming}, record.e2e_s
        )
        first_engine = record.context_engine or record.generation_engine
        if record.ttft_s is not None:
            labels = {"path": record.path or "none", "engine": first_engine or "none", "streaming": streaming}
            self.observe("disagg_request_ttft_seconds", labels, record.ttft_s)
        if record.tpot_s is not None:
            self.observe(
                "disagg_request_tpot_seconds",
                {"engine": record.generation_engine or "none", "streaming": streaming},
                record.tpot_s,
            )
        if record.context_s is not None:
            self.observe(
                "disagg_phase_seconds", {"phase": "context", "engine": record.context_engine}, record.context_s
            )
        if record.generation_s is not None:
            phase = "generation" if record.path == "disaggregated" else "local"
            self.observe(
                "disagg_phase_seconds", {"phase": phase, "engine": record.generation_engine}, record.generation_s
            )
        if self.request_log is not None:
            self.request_log(record.log_line())
