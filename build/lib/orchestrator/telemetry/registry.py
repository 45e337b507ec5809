"""Where metrics go: Triton's custom metrics (`pb_utils.MetricFamily`) or plain memory.

The library records counters, gauges and histograms through `Registry`, so what is
measured is decided (and tested) without Triton; `TritonRegistry` puts them on Triton's
`/metrics` endpoint, `MemoryRegistry` keeps them in dicts (unit tests; tools).

Every update through `TritonRegistry` is an IPC message from the python backend stub to
the server (about 50-90 us), so callers batch: they record per request, not per token,
and from a background flush rather than on a request's path (see `telemetry.py`). Each
`pb_utils.MetricFamily` stays referenced for the registry's lifetime: Triton deletes a
family whose Python object is collected.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Protocol, Sequence

Labels = Mapping[str, str]

# Seconds: 1 ms .. ~1 min, roughly x2 apart; covers per-token gaps and whole requests.
TIME_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
BYTE_BUCKETS: tuple[float, ...] = tuple(float(4**k * 1024) for k in range(1, 12))  # 4 KiB .. 4 GiB


class Registry(Protocol):
    def inc(self, name: str, labels: Labels, amount: float = 1.0) -> None: ...

    def set(self, name: str, labels: Labels, value: float) -> None: ...

    def observe(self, name: str, labels: Labels, value: float) -> None: ...


class MetricSpec:
    """A family's kind, help text and (histograms) buckets, declared once."""

    __slots__ = ("name", "kind", "description", "buckets")

    def __init__(self, name: str, kind: str, description: str, buckets: Sequence[float] = ()) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {kind!r}")
        self.name, self.kind, self.description, self.buckets = name, kind, description, tuple(buckets)


def _key(labels: Labels) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class MemoryRegistry:
    """Metrics as dicts: counters and gauges by (name, labels); histograms keep every value."""

    def __init__(self, specs: Sequence[MetricSpec] = ()) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)

    def inc(self, name: str, labels: Labels, amount: float = 1.0) -> None:
        self.values[(name, _key(labels))] += amount

    def set(self, name: str, labels: Labels, value: float) -> None:
        self.values[(name, _key(labels))] = value

    def observe(self, name: str, labels: Labels, value: float) -> None:
        self.observations[(name, _key(labels))].append(value)

    def value(self, name: str, **labels: str) -> float:
        return self.values.get((name, _key(labels)), 0.0)

    def total(self, name: str) -> float:
        """A counter summed over all its label sets."""
        return sum(v for (n, _), v in self.values.items() if n == name)

    def observed(self, name: str, **labels: str) -> list[float]:
        """Every value observed for `name` whose labels include `labels`."""
        want = set(labels.items())
        return [v for (n, key), vs in self.observations.items() if n == name and want <= set(key) for v in vs]


class TritonRegistry:
    """Metrics on Triton's endpoint through pb_utils; families and metrics made on first use."""

    def __init__(self, pb_utils: Any, specs: Sequence[MetricSpec]) -> None:
        self.pb = pb_utils
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        if hasattr(pb_utils.MetricFamily, "HISTOGRAM"):
            kinds["histogram"] = pb_utils.MetricFamily.HISTOGRAM
        self.specs = {spec.name: spec for spec in specs}
        self._families: dict[str, Any] = {}  # referenced for the model's lifetime
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        for spec in specs:
            if spec.kind in kinds:
                self._families[spec.name] = pb_utils.MetricFamily(
                    name=spec.name, description=spec.description, kind=kinds[spec.kind]
                )

    def _metric(self, name: str, labels: Labels) -> Any:
        key = (name, _key(labels))
        metric = self._metrics.get(key)
        if metric is None:
            family = self._families.get(name)
            if family is None:
                return None  # e.g. a histogram on a Triton without histogram support
            spec = self.specs[name]
            if spec.kind == "histogram":
                metric = family.Metric(labels=dict(labels), buckets=list(spec.buckets))
            else:
                metric = family.Metric(labels=dict(labels))
            self._metrics[key] = metric
        return metric

    def inc(self, name: str, labels: Labels, amount: float = 1.0) -> None:
        metric = self._metric(name, labels)
        if metric is not None and amount:
            metric.increment(float(amount))

    def set(self, name: str, labels: Labels, value: float) -> None:
        metric = self._metric(name, labels)
        if metric is not None:
            metric.set(float(value))

    def observe(self, name: str, labels: Labels, value: float) -> None:
        metric = self._metric(name, labels)
        if metric is not None:
            metric.observe(float(value))
