"""The SLA planner: candidates within the GPU budget, ranked by simulated goodput per GPU,
written as a deployment file the deploy tool accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.bench.goodput import Slo
from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint
from orchestrator.ops.deployment import load
from orchestrator.sim.planner import _tpot_levels, disaggregated_candidates
from orchestrator.tools import plan as plan_tool

GEN = [GenerationPoint(k, 100.0 * k**0.5, 1000.0 / (10 + k)) for k in (1, 2, 4, 8, 16, 32)]  # TPOT 11..42 ms


def test_levels_meeting_the_tpot_bound_and_the_next_one_up() -> None:
    assert _tpot_levels(GEN, Slo(tpot_ms=25)) == [4, 8, 16], "the two highest within 25 ms (14, 18 ms), then 26 ms"
    assert _tpot_levels(GEN, Slo(tpot_ms=5)) == [1], "none meets it: the smallest is tried"
    assert _tpot_levels(GEN, Slo(ttft_ms=100)) == [1, 2, 4, 8, 16, 32]


def test_disaggregated_candidates_fit_the_budget_and_rank_by_rate_matched_goodput() -> None:
    context = {1: [ContextPoint(1, 4.0, 0.3)], 2: [ContextPoint(1, 7.0, 0.2)], 4: [ContextPoint(1, 12.0, 3.0)]}
    generation = {1: GEN, 2: GEN}
    ranked = disaggregated_candidates(8, 100, Slo(ttft_ms=1000, tpot_ms=30), context, generation, keep=50)
    assert ranked and all(shape.gpus <= 8 for shape, _ in ranked)
    assert all(shape.context_tp != 4 for shape, _ in ranked), "tp4 context misses the TTFT bound"
    assert [score for _, score in ranked] == sorted((score for _, score in ranked), reverse=True)
    best, score = ranked[0]
    by_k = {lv.concurrency: lv for lv in GEN}
    rate = {1: 4.0, 2: 7.0}[best.context_tp]
    served = min(best.context * rate, best.generation * by_k[best.max_batch_size].tokens_per_s / 100)
    assert score == pytest.approx(served / best.gpus)


def test_plan_writes_the_best_shape_as_a_deployment_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "planned.yaml"
    rc = plan_tool.main(["--isl", "512", "--osl", "16", "--gpus", "2", "--keep", "2", "--workers", "1",
                         "--out", str(out), "--goodput", "ttft_ms:500", "tpot_ms:30"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "candidates, best goodput per GPU first" in printed and "best: " in printed
    deployment = load(out)  # what `disagg deploy check` runs
    assert sum(p.engines * p.world_size for p in deployment.pools) <= 2
    assert "Predicted (simulator): goodput" in out.read_text()
