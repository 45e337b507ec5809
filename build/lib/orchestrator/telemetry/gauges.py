"""What a model holds right now, published as Triton custom metrics (Prometheus gauges).

Engines publish `disagg_engine_{active_requests,leases,kv_blocks_in_use,kv_blocks_reserved}`,
the orchestrator
`disagg_orchestrator_{in_flight_requests,child_requests,stops_pending,queued_responses}`,
each labelled `model="<model name>"`, on Triton's metrics port (`/metrics`). Those in
`HOLDING` return to zero when nothing is in flight, which is how the tests and the soak
prove that no request, KV block or lease leaked; engines also publish
`disagg_engine_kv_blocks_{free,cached}` (capacity, never zero).

A gauge update is an IPC message from the python backend stub to the server, so values
are sampled every `interval_s` (and only changed ones sent) by a background task rather
than on every state change on the per-token path.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping

# The gauges that count something held: all zero when nothing is in flight and nothing leaked.
HOLDING = frozenset({
    "disagg_engine_active_requests", "disagg_engine_leases", "disagg_engine_kv_blocks_in_use",
    "disagg_engine_kv_blocks_reserved", "disagg_orchestrator_in_flight_requests",
    "disagg_orchestrator_child_requests", "disagg_orchestrator_stops_pending",
    "disagg_orchestrator_queued_responses", "disagg_engine_queued_responses",
})  # fmt: skip

DESCRIPTIONS = {
    "active_requests": "requests queued, pulling KV or running on this engine",
    "leases": "finished prefills whose KV cache waits to be pulled",
    "kv_blocks_in_use": "KV cache blocks referenced by a request or a lease",
    "kv_blocks_reserved": "KV cache blocks reserved for requests' future tokens",
    "kv_blocks_free": "KV cache blocks free to allocate (empty, or holding a reusable prefix)",
    "kv_blocks_cached": "KV cache blocks holding a prefix that a later prompt can reuse",
    "in_flight_requests": "client requests the orchestrator is serving",
    "child_requests": "engine child requests and unpulled leases the orchestrator holds",
    "stops_pending": "stop requests sent to engines and not yet answered",
    "queued_responses": "answers queued for the response sender thread and not yet sent",
}


class StateGauges:
    """Samples `read()` and mirrors it into one gauge per key (`{prefix}_{key}{model=...}`)."""

    def __init__(
        self,
        pb_utils: Any,
        prefix: str,
        model: str,
        read: Callable[[], Mapping[str, int]],
        interval_s: float = 0.1,
        also: Callable[[], object] | None = None,
        instance: str = "",
    ) -> None:
        """`also` runs on the same tick (the telemetry flush: buffered counters and histograms).
        `instance` adds an `instance` label: with several instances of a model, each process
        publishes its own gauges (one set value each would overwrite the others')."""
        self.read = read
        self.interval_s = interval_s
        self.also = also
        self._families: list[Any] = []  # kept alive: a collected family is deleted from the server
        self._gauges: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        for key, value in read().items():
            family = pb_utils.MetricFamily(
                name=f"{prefix}_{key}", description=DESCRIPTIONS.get(key, key), kind=pb_utils.MetricFamily.GAUGE
            )
            self._families.append(family)
            labels = {"model": model, **({"instance": instance} if instance else {})}
            self._gauges[key] = family.Metric(labels=labels)
            self._set(key, value)
        self._task: asyncio.Task[None] | None = None

    def _set(self, key: str, value: int) -> None:
        if self._last.get(key) != value:
            self._gauges[key].set(float(value))
            self._last[key] = value

    def publish(self) -> None:
        for key, value in self.read().items():
            self._set(key, value)

    def ensure_started(self) -> None:
        """Start sampling on the running loop (the stub's loop exists only once execute runs)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.tick()

    def tick(self) -> None:
        """`also` (the telemetry flush) first, then the gauges: once a scrape shows a gauge
        released, what was counted for that work has been flushed too (tests diff on it)."""
        if self.also is not None:
            self.also()
        self.publish()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.tick()
