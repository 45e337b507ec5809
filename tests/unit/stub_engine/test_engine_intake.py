"""The stub engine's intake on its own (orchestrator/stub_engine/intake.py): each reason a
request is refused before anything is queued, and the sequence built for one that is not;
and the fault acts of orchestrator/stub_engine/faults.py that the loop and the per-sequence
work ask (which fault a request acts out, chosen_fault, is tested in test_engine_faults.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.faults import HELD, context_crash, refusal, slow_step_s, stream_crash
from orchestrator.stub_engine.intake import Intake
from orchestrator.stub_engine.kv_cache import KVCacheManager
from orchestrator.telemetry.recorder import ENGINE_SPECS, Telemetry
from orchestrator.telemetry.registry import MemoryRegistry
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.contract import RequestType
from orchestrator.wire.errors import ErrorCode, InvalidInput, Overloaded, RequestError
from tests.engine_harness import PROMPT, request

NOW = 1_000_000


@dataclass
class Exchange:
    """Stands in for KvExchange.check: records the calls, returns a marker or raises `error`."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    error: Exception | None = None
    handoff: object = field(default_factory=object)

    def check(self, req: Any, now_ns: int) -> object:
        self.calls.append((req.request_id, now_ns))
        if self.error is not None:
            raise self.error
        return self.handoff


def make(exchange: Exchange | None = None, **config: Any) -> tuple[Intake, MemoryRegistry]:
    cfg = EngineConfig.free(**config)
    registry = MemoryRegistry(ENGINE_SPECS)
    kv = KVCacheManager(BlockPool(cfg.num_kv_blocks), cfg.tokens_per_block, cfg.enable_kv_cache_reuse)
    intake = Intake("eng", cfg, kv, exchange or Exchange(), Telemetry(registry, deferred=False), lambda: NOW)  # type: ignore[arg-type]
    return intake, registry


class Sink:
    def send(self, output: Any, final: bool) -> None:
        raise AssertionError("intake sends nothing")

    def fail(self, error: RequestError) -> None:
        raise AssertionError("intake fails nothing: it raises")

    def cancelled(self) -> bool:
        return False


def test_a_servable_request_becomes_a_sequence_with_its_hashes_and_arrival() -> None:
    intake, _ = make(tokens_per_block=4)
    req = request(PROMPT, rid="a")
    sink = Sink()
    seq = intake.sequence(req, sink, None, waiting=0)
    assert seq.request is req and seq.sink is sink and seq.fault == "none"
    assert seq.tokens == list(PROMPT) and seq.arrival_ns == NOW and seq.handoff is None
    assert seq.hashes == block_hashes(PROMPT, 4) and seq.hashes
    assert not seq.done and not seq.closed and seq.alloc is None


def test_without_prefix_reuse_no_hashes_are_computed() -> None:
    intake, _ = make(enable_kv_cache_reuse=False)
    assert intake.sequence(request(PROMPT), Sink(), None, waiting=0).hashes == []


def test_a_generation_request_carries_its_checked_handoff_and_a_bad_one_is_refused() -> None:
    exchange = Exchange()
    intake, _ = make(exchange)
    seq = intake.sequence(request(PROMPT, rid="g", request_type=RequestType.GENERATION_ONLY), Sink(), None, 0)
    assert seq.handoff is exchange.handoff and exchange.calls == [("g", NOW)]
    exchange.error = InvalidInput("context_phase_params: the signature does not match")
    with pytest.raises(InvalidInput, match="signature"):
        intake.sequence(request(PROMPT, rid="h", request_type=RequestType.GENERATION_ONLY), Sink(), None, 0)
    intake.sequence(request(PROMPT, rid="agg"), Sink(), None, 0)
    assert [rid for rid, _ in exchange.calls] == ["g", "h"]  # only generation_only requests are checked


@pytest.mark.parametrize("asked, configured", [("fail", "none"), (None, "fail")])
def test_an_injected_fail_is_refused_unavailable_before_any_other_check(asked: object, configured: str) -> None:
    intake, _ = make(fault=configured, max_input_len=4)
    with pytest.raises(RequestError) as refused:
        intake.sequence(request(PROMPT), Sink(), asked, waiting=0)  # the prompt is too long too
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert refused.value.message == "engine 'eng' failed the request (injected fault)"


def test_a_chosen_fault_rides_on_the_sequence_and_an_unknown_one_is_refused() -> None:
    intake, _ = make()
    assert intake.sequence(request(PROMPT), Sink(), "stall", waiting=0).fault == "stall"
    with pytest.raises(InvalidInput, match="'fault'='explode' is unknown"):
        intake.sequence(request(PROMPT), Sink(), "explode", waiting=0)


def test_a_prompt_the_engine_cannot_take_is_invalid_input() -> None:
    intake, _ = make(max_input_len=8)
    with pytest.raises(InvalidInput, match="more than engine 'eng' max_input_len=8"):
        intake.sequence(request(tuple(range(9))), Sink(), None, waiting=0)


def test_a_request_larger_than_the_whole_cache_is_invalid_input() -> None:
    intake, _ = make(tokens_per_block=8, max_tokens_in_paged_kv_cache=64)  # 8 blocks in all
    intake.sequence(request(tuple(range(32)), max_tokens=32), Sink(), None, waiting=0)  # exactly 8 blocks: fits
    with pytest.raises(InvalidInput) as refused:
        intake.sequence(request(tuple(range(32)), max_tokens=33), Sink(), None, waiting=0)
    assert "needs 9 KV blocks (prompt + max_tokens = 65 tokens) but engine 'eng' has 8" in refused.value.message


def test_a_full_queue_refuses_overloaded_and_counts_it() -> None:
    intake, registry = make(max_queued_requests=2)
    intake.sequence(request(PROMPT), Sink(), None, waiting=1)
    for _ in range(2):
        with pytest.raises(Overloaded) as refused:
            intake.sequence(request(PROMPT), Sink(), None, waiting=2)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "engine 'eng' has 2 requests waiting for admission (max_queued_requests=2)" in refused.value.message
    assert registry.value("disagg_engine_rejected_total", engine="eng", reason="overloaded") == 2
    unbounded, _ = make(max_queued_requests=0)
    unbounded.check_queue(10_000)


# -- fault acts ------------------------------------------------------------------------------


def test_fault_acts_only_for_their_fault() -> None:
    cfg = EngineConfig.free(fault_delay_ms=250.0, fault_after_tokens=3)
    assert HELD == {"hang", "stall"}
    assert refusal("eng", "none") is None and refusal("eng", "crash") is None
    assert slow_step_s(cfg, ["none", "crash"]) == 0.0 and slow_step_s(cfg, []) == 0.0
    assert slow_step_s(cfg, ["none", "slow", "slow"]) == 0.25  # once per step, however many are slow
    assert context_crash("eng", "slow") is None
    crash = context_crash("eng", "crash")
    assert crash is not None and crash.code is ErrorCode.UNAVAILABLE
    assert crash.message == "engine 'eng' crashed before the context response (injected fault)"
    assert stream_crash(cfg, "eng", "crash", 2) is None  # not yet: after fault_after_tokens
    assert stream_crash(cfg, "eng", "slow", 9) is None
    mid = stream_crash(cfg, "eng", "crash", 3)
    assert mid is not None and mid.code is ErrorCode.UNAVAILABLE
    assert mid.message == "engine 'eng' crashed mid-stream (injected fault)"
