"""What the orchestrator and engines record per request, without Triton: outcomes, phase
times, routing counters, prefix reuse, KV transfers; the request log line and its rate
limit. Engines and orchestrator record into a MemoryRegistry (the same code path that feeds
Triton's metrics through TritonRegistry)."""

from __future__ import annotations

import numpy as np

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.telemetry.recorder import RateLimitedLog, RequestRecord, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry, MetricSpec, TritonRegistry
from orchestrator.wire.contract import parse_request
from tests.fake_pb_utils import FakePbUtils
from tests.pipeline_harness import PROMPTS, Cluster, RecordingResponseSink, client_tensors, run


def registry(c: Cluster) -> MemoryRegistry:
    reg = c.orch.telemetry.registry
    assert isinstance(reg, MemoryRegistry)
    return reg


def engine_registry(c: Cluster, name: str) -> MemoryRegistry:
    reg = c.cores[name].telemetry.registry
    assert isinstance(reg, MemoryRegistry)
    return reg


def test_each_request_is_counted_once_by_outcome_with_its_phase_times() -> None:
    async def body(c: Cluster) -> None:
        for streaming in (True, False, True):
            (await c.serve(client_tensors(PROMPTS["ascii"], 6, streaming=streaming))).succeeded()
        bad = client_tensors(PROMPTS["ascii"], 6, streaming=True)
        bad["input_ids"] = np.array([[5] * 5000], dtype=np.int32)  # longer than the engines take
        bad["input_lengths"] = np.array([[5000]], dtype=np.int32)
        (await c.serve(bad)).failed()
        reg = registry(c)
        assert reg.value("disagg_requests_total", outcome="ok", streaming="true") == 2
        assert reg.value("disagg_requests_total", outcome="ok", streaming="false") == 1
        assert reg.value("disagg_requests_total", outcome="invalid_arg", streaming="true") == 1
        ttft = reg.observed("disagg_request_ttft_seconds", path="disaggregated")
        e2e = reg.observed("disagg_request_e2e_seconds", path="disaggregated")
        assert len(ttft) == 3 and len(e2e) == 4 and all(t >= 0 for t in ttft)
        assert len(reg.observed("disagg_request_tpot_seconds")) == 3
        assert len(reg.observed("disagg_phase_seconds", phase="context")) == 3
        assert len(reg.observed("disagg_phase_seconds", phase="generation")) == 3
        assert reg.total("disagg_routing_decisions_total") == 2 * 3 + 2  # the refused one: routed, then refused
        assert reg.total("disagg_routing_disaggregated_total") == 4

    run(body)


def test_retries_and_local_path_are_counted() -> None:
    async def body(c: Cluster) -> None:
        (await c.serve(client_tensors(PROMPTS["ascii"], 4, streaming=True))).succeeded()  # ctx retried once
        (await c.serve(client_tensors("hi", 4, streaming=True))).succeeded()  # short: local
        reg = registry(c)
        assert reg.value("disagg_routing_retries_total", phase="context") == 1
        assert reg.value("disagg_routing_local_total", reason="short_prompt") == 1
        assert len(reg.observed("disagg_phase_seconds", phase="local")) == 1

    fail = EngineConfig.free(kv_lease_timeout_s=0.5, fault="fail")
    run(body, configs={"context_0": fail}, routing={"context_policy": "round_robin", "local_prefill_max_tokens": 4})


def test_stopped_cancelled_and_timed_out_requests_have_their_own_outcomes() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"], 3000, streaming=True)
        sink = RecordingResponseSink(c.client)
        task = c.orch.start(parse_request(tensors, {}, "s"), tensors, sink)
        await sink.first.wait()
        stop = client_tensors("x", 1, streaming=False)
        stop["stop"] = np.array([[True]])
        c.orch.stop(parse_request(stop, {}, "s"), RecordingResponseSink())
        await task
        (await c.serve(client_tensors(PROMPTS["emoji"], 3000, streaming=True), "late")).failed()
        reg = registry(c)
        assert reg.value("disagg_requests_total", outcome="stopped", streaming="true") == 1
        assert reg.value("disagg_requests_total", outcome="timed_out", streaming="true") == 1

    slow = EngineConfig.free(kv_lease_timeout_s=0.5, decode_ms_per_step=2.0)
    run(body, configs={"generation_0": slow, "generation_1": slow}, routing={"request_timeout_s": 0.3})


def test_engines_record_queue_time_transfers_and_prefix_reuse() -> None:
    async def body(c: Cluster) -> None:
        tensors = client_tensors(PROMPTS["ascii"] * 8, 4, streaming=False)
        for _ in range(2):  # the same prompt twice: the second finds its prefix cached
            (await c.serve(tensors)).succeeded()
        ctx = engine_registry(c, "context_0")
        gen = engine_registry(c, "generation_0")
        assert len(ctx.observed("disagg_engine_queue_seconds", phase="context_only")) == 2
        assert ctx.value("disagg_engine_prefix_hit_blocks_total", engine="context_0") > 0
        transfers = gen.observed("disagg_engine_kv_transfer_bytes")
        assert transfers and transfers[0] > 0
        assert len(gen.observed("disagg_engine_kv_transfer_seconds")) == len(transfers)

    run(body, routing={"context_policy": "kv_aware", "generation_policy": "kv_aware"})


def test_request_log_line_has_every_key_and_the_rate_limit_summarises() -> None:
    record = RequestRecord(
        request_id="r1", streaming=True, outcome="ok", path="disaggregated", context_engine="context_1",
        generation_engine="generation_0", prompt_tokens=12, output_tokens=5, retries=0, arrival_ns=1_000_000_000,
        context_sent_ns=1_001_000_000, context_done_ns=1_011_000_000, generation_sent_ns=1_011_000_000,
        first_token_ns=1_011_000_000, last_token_ns=1_051_000_000, end_ns=1_052_000_000,
    )  # fmt: skip
    line = record.log_line()
    assert line == (
        "request id=r1 outcome=ok path=disaggregated context=context_1 generation=generation_0 streaming=true "
        "prompt_tokens=12 output_tokens=5 retries=0 migrations=0 ttft_ms=11.0 context_ms=10.0 generation_ms=41.0 tpot_ms=10.0 e2e_ms=52.0"
    )
    now = [0.0]
    lines: list[str] = []
    limited = RateLimitedLog(lines.append, per_s=2, clock=lambda: now[0])
    for i in range(5):
        limited(f"line {i}")
    assert lines == ["line 0", "line 1"] and limited.suppressed == 3
    now[0] = 1.0
    limited("line 5")
    assert lines[2:] == ["(3 request lines suppressed above log_requests_per_s=2)", "line 5"]


def test_deferred_telemetry_reaches_the_registry_only_on_flush() -> None:
    reg = MemoryRegistry()
    telemetry = Telemetry(reg)
    telemetry.inc("disagg_requests_total", {"outcome": "ok"})
    telemetry.observe("disagg_request_e2e_seconds", {}, 0.5)
    assert reg.total("disagg_requests_total") == 0
    assert telemetry.flush() == 2
    assert reg.total("disagg_requests_total") == 1 and reg.observed("disagg_request_e2e_seconds") == [0.5]


def test_triton_registry_declares_families_once_and_makes_one_metric_per_label_set() -> None:
    """Against a stand-in for pb_utils' metrics API (Triton's, not ours): tests/fake_pb_utils.py."""
    specs = [MetricSpec("a_total", "counter", "a"), MetricSpec("b_seconds", "histogram", "b", (0.1, 1.0))]
    reg = TritonRegistry(FakePbUtils(), specs)
    reg.inc("a_total", {"x": "1"})
    reg.inc("a_total", {"x": "1"}, 2)
    reg.observe("b_seconds", {"x": "1"}, 0.5)
    families = {f.name: f for f in reg._families.values()}
    assert [m.calls for m in families["a_total"].metrics] == [[("increment", 1.0), ("increment", 2.0)]]
    (hist,) = families["b_seconds"].metrics
    assert hist.buckets == [0.1, 1.0] and hist.calls == [("observe", 0.5)]
