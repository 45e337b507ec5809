"""The frontend's own metrics, in Prometheus text on GET /metrics (prometheus_client, one
registry per app so several apps in one process, as in tests, do not collide).

    disagg_frontend_requests_total{endpoint,outcome}    outcome: ok, client_error, unavailable,
                                                         error, disconnected
    disagg_frontend_in_flight{endpoint}                 requests being answered now
    disagg_frontend_ttft_seconds{endpoint}              request arrival -> first text sent (streaming)
    disagg_frontend_request_seconds{endpoint}           request arrival -> last byte sent
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 503:
        return "unavailable"
    return "client_error" if status < 500 else "error"


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "disagg_frontend_requests", "OpenAI requests answered, by endpoint and outcome",
            ["endpoint", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "disagg_frontend_in_flight", "OpenAI requests being answered", ["endpoint"], registry=self.registry
        )  # fmt: skip
        self.ttft = Histogram(
            "disagg_frontend_ttft_seconds", "arrival to first text sent, streaming requests",
            ["endpoint"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "disagg_frontend_request_seconds", "arrival to the response's end",
            ["endpoint"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip

    def finished(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
