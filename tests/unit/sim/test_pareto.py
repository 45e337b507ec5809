"""Frontiers, rate matching, steady-state measures and GPU-scale shapes: the study's arithmetic."""

from __future__ import annotations

import pytest

from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint
from orchestrator.bench.stats import RequestResult
from orchestrator.ops.deployment import parse
from orchestrator.sim.pareto import Point, at_user_speed, frontier, rate_matched, whole_engines
from orchestrator.sim.shapes import H100, Gpu, Shape, deployment_data
from orchestrator.sim.steady import steady


def point(user: float, gpu: float, kind: str = "aggregated") -> Point:
    return Point(kind, Shape(1), 1, user, gpu)


def test_the_frontier_keeps_points_no_other_beats_on_both_axes() -> None:
    pts = [point(10, 100), point(20, 90), point(15, 80), point(30, 50), point(30, 40), point(5, 60)]
    assert [(p.tokens_per_s_per_user, p.tokens_per_s_per_gpu) for p in frontier(pts)] == [(10, 100), (20, 90), (30, 50)]
    front = frontier(pts)
    assert at_user_speed(front, 5) == 100, "slower users than the slowest point: its throughput"
    assert at_user_speed(front, 15) == pytest.approx(95) and at_user_speed(front, 25) == pytest.approx(70)
    assert at_user_speed(front, 30) == 50 and at_user_speed(front, 31) is None


def test_rate_matching_takes_the_best_context_size_at_the_ideal_ratio() -> None:
    context = {1: [ContextPoint(1, 2.0, 0.5), ContextPoint(4, 4.0, 3.0)], 2: [ContextPoint(1, 5.0, 0.2)]}
    generation = {1: [GenerationPoint(8, 800.0, 100.0)]}
    (p,) = rate_matched(1000, 100, context, generation, ttft_bound_s=1.0)
    # tp1 context: 2 req/s within the bound -> x = 800 / (100 * 2) = 4 engines -> 800 / (1 + 4) = 160 per GPU
    # tp2 context: 5 req/s -> x = 1.6 engines of 2 GPUs -> 800 / (1 + 3.2) = 190.5 per GPU: better
    assert p.shape.context_tp == 2 and p.context_per_generation == pytest.approx(1.6)
    assert p.tokens_per_s_per_gpu == pytest.approx(800 / 4.2) and p.tokens_per_s_per_user == 100


def test_whole_engines_come_close_to_the_ratio_with_few_engines() -> None:
    assert whole_engines(0.5) == (1, 2)
    assert whole_engines(1.0) == (1, 1)
    assert whole_engines(0.3) == (1, 3)
    assert whole_engines(5.8) == (6, 1), "within 10%: the fewest engines"
    assert whole_engines(2.4) == (5, 2), "2/1 is 17% off, 5/2 4%"
    assert whole_engines(2.4, tolerance=0.01) == (7, 3), "closest of 2/1, 5/2, 7/3, 10/4 (2.33)"


def result(start: float, ttft: float, e2e: float, tokens: int = 11) -> RequestResult:
    return RequestResult("r", start, ttft, (), e2e, 100, tokens)


def test_steady_state_counts_completions_between_the_first_wave_and_the_drain() -> None:
    """Two users, a request a second each, the second user half a second behind; the first
    wave queued (2 s each) and the last requests drain alone (faster): neither counts."""
    users = 2
    results = [result(0.0, 1.0, 2.0), result(0.5, 1.0, 2.0)]  # the first wave, slowed by queueing
    for i in range(8):
        results += [result(2.0 + i, 0.1, 1.0), result(2.5 + i, 0.1, 1.0)]  # two completions a second
    results += [result(10.0, 0.1, 1.0), result(10.5, 0.1, 0.5)]  # the drain: the last one alone, faster
    s = steady(results, users)
    assert s.requests_per_s == pytest.approx(2.0) and s.tokens_per_s == pytest.approx(22.0)
    assert s.tokens_per_s_per_user == pytest.approx(10 / 0.9) and s.tpot_p50_s == pytest.approx(0.09)
    assert s.ttft_p50_s == pytest.approx(0.1)
    whole = len(results) / (11.0 - 0.0)
    assert whole < 1.9, "the whole run's rate would be biased by ramp and drain"


def test_a_gpu_keeps_what_the_weights_leave_for_kv() -> None:
    # (80 - 16) GB x 0.9 / 128 KiB per token, whole 32-token blocks
    assert H100.kv_tokens(1) == int(64 * 0.9e9 // (131072 * 32)) * 32
    assert H100.kv_tokens(8) > 9 * H100.kv_tokens(1), "the weights are paid once, the cache grows with every GPU"
    with pytest.raises(ValueError, match="cannot hold"):
        Gpu(memory_gb=8).kv_tokens(1)


@pytest.mark.parametrize("shape", [Shape(4, 2, max_batch_size=32), Shape(2, 4, context=3, context_tp=1)])
def test_a_shape_is_a_valid_deployment_file(shape: Shape) -> None:
    d = parse(deployment_data(shape, 8192))
    gen = d.pool("generation")
    assert gen is not None and gen.engines == shape.generation and gen.tensor_parallel == shape.generation_tp
    assert sum(p.engines * p.world_size for p in d.pools) == shape.gpus
    assert gen.stub.get("enable_chunked_context") == ("true" if shape.aggregated else None)
    assert gen.stub["max_tokens_in_paged_kv_cache"] == str(H100.kv_tokens(shape.generation_tp))
