"""Metrics on a real tritonserver's /metrics, judged by deltas around known traffic.

Counters and histograms are flushed from each model every 100 ms, so each test first waits
(bounded) until the expected count has arrived, then asserts the exact deltas."""

from __future__ import annotations

from typing import Callable

from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import samples, samples_until, total, wait_released

PREFIX = "Answer from the manual, section by section, and be brief about it please. " * 6


def settle(server: TritonServer, ready: Callable[[list], bool], timeout_s: float = 10.0) -> list:
    return samples_until(server.metrics_url, ready, timeout_s)


def test_known_traffic_moves_counters_and_histograms_by_exactly_that_much(server: TritonServer) -> None:
    assert wait_released(server.metrics_url, 10) == {}
    before = samples(server.metrics_url)
    runs = [(True, 6), (True, 5), (False, 4)]
    for i, (stream, max_tokens) in enumerate(runs):
        out = list(generate(server.grpc_url, f"the cat sat on the mat, take {i}", max_tokens, stream=stream))
        assert out[-1].final

    def delta(scraped: list, name: str, **labels: str) -> float:
        return total(scraped, name, **labels) - total(before, name, **labels)

    def flushed(s: list) -> bool:  # every model flushes its own telemetry, each on its own 100 ms tick
        return (
            delta(s, "disagg_requests_total") >= 3 and delta(s, "disagg_phase_seconds_count") >= 6
            and delta(s, "disagg_engine_queue_seconds_count") >= 6 and delta(s, "disagg_engine_kv_transfer_seconds_count") >= 3
        )  # fmt: skip

    after = settle(server, flushed)
    assert delta(after, "disagg_requests_total", outcome="ok", streaming="true") == 2
    assert delta(after, "disagg_requests_total", outcome="ok", streaming="false") == 1
    assert delta(after, "disagg_requests_total") == 3  # nothing else ended
    assert delta(after, "disagg_request_ttft_seconds_count", path="disaggregated") == 3
    assert delta(after, "disagg_request_e2e_seconds_count") == 3
    assert delta(after, "disagg_request_tpot_seconds_count") == 3
    assert delta(after, "disagg_phase_seconds_count", phase="context") == 3
    assert delta(after, "disagg_phase_seconds_count", phase="generation") == 3
    assert delta(after, "disagg_routing_decisions_total", phase="context") == 3
    assert delta(after, "disagg_routing_decisions_total", phase="generation") == 3
    assert delta(after, "disagg_routing_disaggregated_total") == 3
    assert delta(after, "disagg_engine_queue_seconds_count", phase="context_only") == 3
    assert delta(after, "disagg_engine_queue_seconds_count", phase="generation_only") == 3
    assert delta(after, "disagg_engine_kv_transfer_seconds_count") == 3
    assert delta(after, "disagg_engine_kv_transfer_bytes_sum") > 0
    # a histogram's +Inf bucket counts every observation
    assert delta(after, "disagg_request_e2e_seconds_bucket", le="+Inf") == 3


def test_repeated_prefixes_raise_the_reuse_counters(server: TritonServer) -> None:
    before = samples(server.metrics_url)
    for i in range(3):
        list(generate(server.grpc_url, f"{PREFIX} question {i}?", 2, stream=False))

    def hits(scraped: list) -> float:
        return total(scraped, "disagg_engine_prefix_hit_blocks_total") - total(
            before, "disagg_engine_prefix_hit_blocks_total"
        )

    after = settle(server, lambda s: hits(s) > 0)
    assert hits(after) > 0
    cached = {labels["model"]: value for name, labels, value in after if name == "disagg_engine_kv_blocks_cached"}
    assert any(value > 0 for value in cached.values()), cached
