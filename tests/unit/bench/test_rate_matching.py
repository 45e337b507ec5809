"""Rate matching on fixed sweep numbers, worked by hand in the comments."""

from __future__ import annotations

import pytest

from orchestrator.bench.rate_matching import (
    ContextPoint,
    GenerationPoint,
    RatePoint,
    best_ratios,
    combine,
    context_capacity,
    pareto,
)

CTX = [ContextPoint(1, 10.0, 0.05), ContextPoint(2, 18.0, 0.09), ContextPoint(4, 25.0, 0.2)]
GEN = [GenerationPoint(8, 800.0, 100.0), GenerationPoint(32, 2000.0, 62.5)]


def test_context_capacity_is_the_best_rate_within_the_ttft_bound() -> None:
    assert context_capacity(CTX, 0.1) == 18.0
    assert context_capacity(CTX, 0.5) == 25.0
    assert context_capacity(CTX, 0.01) == 0.0


def test_combine_takes_the_slower_side_and_divides_by_every_engine() -> None:
    # 1 ctx at 18 req/s vs 2 gen at 800 tok/s / 100 tokens = 16 req/s: generation-bound.
    point = combine(18.0, GEN[0], osl=100, context_engines=1, generation_engines=2)
    assert point.requests_per_s == 16.0 and point.tokens_per_s == 1600.0
    assert point.tokens_per_s_per_engine == pytest.approx(1600 / 3)
    assert point.bottleneck == "generation" and point.label == "c1g2" and point.tokens_per_s_per_user == 100.0
    assert combine(18.0, GEN[1], 100, 1, 2).bottleneck == "context"  # 18 < 2 x 20


def test_best_ratio_per_concurrency() -> None:
    # k=8: c1g1 400, c1g2 533.3, c2g1 266.7, c1g3 450, c2g2 400, c3g1 200 tok/s/engine -> c1g2.
    # k=32: c1g1 900, c1g2 600, c2g1 666.7, c1g3 450, c2g2 900, c3g1 500 -> tie, fewer engines: c1g1.
    best = best_ratios(18.0, GEN, osl=100, max_engines=4)
    assert [(p.concurrency, p.label) for p in best] == [(8, "c1g2"), (32, "c1g1")]
    assert best[0].tokens_per_s_per_engine == pytest.approx(533.333, rel=1e-4)
    assert best[1].tokens_per_s_per_engine == pytest.approx(900.0)


def test_pareto_keeps_only_points_nobody_beats_on_both_axes() -> None:
    def point(user: float, engine: float) -> RatePoint:
        return RatePoint(1, 1, 1, 0.0, 0.0, engine, user, "context")

    points = [point(100, 500), point(60, 900), point(80, 400), point(60, 700), point(120, 300)]
    assert [(p.tokens_per_s_per_user, p.tokens_per_s_per_engine) for p in pareto(points)] == [
        (60, 900),
        (100, 500),
        (120, 300),
    ]


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        combine(1.0, GEN[0], osl=0, context_engines=1, generation_engines=1)
