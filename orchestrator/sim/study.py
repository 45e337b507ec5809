"""The agg-vs-disagg study of one workload: every sweep, the three frontiers, the speedups.

`run_study(isl, osl)` runs (in worker processes: each simulation is independent):
the context and generation phase sweeps for every tensor-parallel size, the aggregated
engines end to end at every level, then the rate-matched disaggregated points and the
end-to-end runs of the shapes on their frontier. `speedups` reads the frontiers at fixed
tokens/s per user: disaggregated over aggregated, and end to end over rate-matched.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence, TypeVar

from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint
from orchestrator.sim.pareto import (
    LEVELS,
    TP_SIZES,
    Point,
    at_user_speed,
    end_to_end,
    frontier,
    rate_matched,
    whole_engines,
)  # fmt: skip
from orchestrator.sim.phase_sweeps import context_sweep, generation_sweep
from orchestrator.sim.shapes import H100, MAX_NUM_TOKENS, Shape
from orchestrator.stub_engine.config import EngineConfig

T = TypeVar("T")
CONTEXT_LEVELS = (1, 2, 4, 8, 16)


@dataclass(frozen=True, slots=True)
class Study:
    isl: int
    osl: int
    ttft_bound_s: float
    context: dict[int, list[ContextPoint]]
    generation: dict[int, list[GenerationPoint]]
    aggregated: list[Point]
    rate_matched: list[Point]
    end_to_end: list[Point]

    def frontiers(self) -> dict[str, list[Point]]:
        return {"aggregated": frontier(self.aggregated), "rate-matched": frontier(self.rate_matched),
                "end-to-end": frontier(self.end_to_end)}  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        fronts = self.frontiers()
        return {
            "isl": self.isl, "osl": self.osl, "ttft_bound_s": self.ttft_bound_s,
            "context": {tp: [asdict(lv) for lv in lvs] for tp, lvs in self.context.items()},
            "generation": {tp: [asdict(lv) for lv in lvs] for tp, lvs in self.generation.items()},
            "points": [p.as_dict() for p in (*self.aggregated, *self.rate_matched, *self.end_to_end)],
            "frontiers": {kind: [p.as_dict() for p in pts] for kind, pts in fronts.items()},
            "speedups": speedups(self),
        }  # fmt: skip


def engine_config(tp: int, isl: int, batch: int) -> EngineConfig:
    return EngineConfig(tensor_parallel_size=tp, max_input_len=isl, max_num_tokens=MAX_NUM_TOKENS, max_batch_size=batch,
                        max_tokens_in_paged_kv_cache=H100.kv_tokens(tp), max_queued_requests=0)  # fmt: skip


def context_sweeps(args: tuple[int, int]) -> tuple[int, list[ContextPoint]]:
    """(tp, isl) -> (tp, the context sweep of an engine of tp GPUs): a picklable job."""
    tp, isl = args
    return tp, context_sweep(engine_config(tp, isl, max(CONTEXT_LEVELS)), isl, CONTEXT_LEVELS)


def generation_sweeps(args: tuple[int, int, int]) -> tuple[int, list[GenerationPoint]]:
    """(tp, isl, osl) -> (tp, the generation sweep of an engine of tp GPUs): a picklable job."""
    tp, isl, osl = args
    return tp, generation_sweep(engine_config(tp, isl, max(LEVELS)), isl, osl, LEVELS)


def _e2e(args: tuple[Shape, int, int, int, str, float]) -> Point:
    return end_to_end(*args)


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], workers: int) -> list[T]:
    """`fn` over `items` in `workers` processes (simulations are independent and CPU-bound)."""
    if workers <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def run_study(isl: int, osl: int, ttft_bound_s: float = 2.0, workers: int | None = None,
              tp_sizes: Sequence[int] = TP_SIZES, levels: Sequence[int] = LEVELS) -> Study:  # fmt: skip
    workers = workers or os.cpu_count() or 1
    context = dict(parallel_map(context_sweeps, [(tp, isl) for tp in tp_sizes], workers))
    generation = dict(parallel_map(generation_sweeps, [(tp, isl, osl) for tp in tp_sizes], workers))
    generation = {tp: [lv for lv in lvs if lv.concurrency in levels] for tp, lvs in generation.items()}
    agg_jobs = [(Shape(1, tp, max_batch_size=k), isl, osl, k, "aggregated", 0.0) for tp in tp_sizes for k in levels]
    matched = rate_matched(isl, osl, context, generation, ttft_bound_s)
    e2e_jobs = []
    for p in frontier(matched):
        c, g = whole_engines(p.context_per_generation)
        shape = replace(p.shape, context=c, generation=g)
        e2e_jobs.append((shape, isl, osl, p.users_per_engine, "end-to-end", c / g))
    points = parallel_map(_e2e, agg_jobs + e2e_jobs, workers)
    return Study(isl, osl, ttft_bound_s, context, generation, points[: len(agg_jobs)], matched,
                 points[len(agg_jobs) :])  # fmt: skip


USER_SPEEDS = (10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500)  # tokens/s per user where frontiers are read


def speedups(study: Study, per_user: Sequence[float] = USER_SPEEDS) -> dict[str, Any]:
    """Disaggregated (rate-matched, end to end) over aggregated tokens/s per GPU at fixed tokens/s
    per user, each frontier read between its points (`pareto.at_user_speed`)."""
    fronts = study.frontiers()
    agg, rm, e2e = fronts["aggregated"], fronts["rate-matched"], fronts["end-to-end"]
    speeds = sorted(per_user)
    rows: list[dict[str, Any]] = []
    for u in speeds:
        a, r, e = at_user_speed(agg, u), at_user_speed(rm, u), at_user_speed(e2e, u)
        rows.append({
            "tokens_per_s_per_user": u, "aggregated": a, "rate_matched": r, "end_to_end": e,
            "rate_matched_speedup": r / a if a and r else None, "end_to_end_speedup": e / a if a and e else None,
            "end_to_end_gap": 1 - e / r if r and e else None,
        })  # fmt: skip

    def span(key: str) -> list[float] | None:
        values = [float(row[key]) for row in rows if row[key] is not None]
        return [min(values), max(values)] if values else None

    return {"rows": rows, "rate_matched_speedup": span("rate_matched_speedup"),
            "end_to_end_speedup": span("end_to_end_speedup"), "end_to_end_gap": span("end_to_end_gap")}  # fmt: skip
