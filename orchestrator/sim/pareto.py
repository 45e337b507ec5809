"""Aggregated vs disaggregated at GPU scale: Pareto frontiers of tokens/s per GPU against
tokens/s per user, rate-matched and end to end, in the simulator.

For one workload (ISL, OSL):
- aggregated: one engine of tp GPUs (chunked context on) at each per-engine concurrency k,
  simulated end to end; per-GPU figures divide by tp (engines of a pool are alike, so one
  engine's figures are the pool's per GPU).
- rate-matched disaggregated: each phase alone (`phase_sweeps.py`): a context engine of
  tp_c GPUs sustains r requests/s (TTFT p50 within a bound); a generation engine of tp_g
  GPUs decodes T tokens/s at concurrency k, U tokens/s per user. Context engines matched
  to its rate, x = T / (OSL r) of them per generation engine, make a point
  (U, T / (tp_g + x tp_c)): the ideal, fractional ratio.
- end-to-end disaggregated: the rate-matched frontier's shapes built with whole engines
  (g generation engines, c = round(g x) >= 1 context engines, g chosen to make c/g close
  to x), served end to end at k users per generation engine.

Throughput and what users see are measured in steady state (`steady.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint, context_capacity
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.sim.driver import simulate
from orchestrator.sim.requests import from_workload
from orchestrator.sim.shapes import Shape, deployment
from orchestrator.sim.steady import steady

LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # users per generation (or aggregated) engine
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class Point:
    """One deployment at one load: what each user sees and what each GPU produces."""

    kind: str  # "aggregated", "rate-matched" or "end-to-end"
    shape: Shape
    users_per_engine: int
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float
    context_per_generation: float = 0.0  # x: context engines per generation engine
    ttft_p50_s: float | None = None
    tpot_p50_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "shape": self.shape.label, "gpus": self.shape.gpus, "k": self.users_per_engine,
                "tokens_per_s_per_user": self.tokens_per_s_per_user, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "context_per_generation": self.context_per_generation, "ttft_p50_s": self.ttft_p50_s,
                "tpot_p50_s": self.tpot_p50_s}  # fmt: skip


def requests_for(users: int) -> int:
    return max(48, 4 * users)


def end_to_end(shape: Shape, isl: int, osl: int, users_per_engine: int, kind: str, x: float = 0.0) -> Point:
    """Simulate `shape` with `users_per_engine` closed-loop users per generation engine."""
    users = users_per_engine * shape.generation
    workload = Workload(LengthDist("fixed", isl), LengthDist("fixed", osl))
    run = simulate(deployment(shape, isl), from_workload(workload, requests_for(users), salt=shape.name), users)
    s = steady(run.results, users)
    return Point(kind, shape, users_per_engine, s.tokens_per_s_per_user, s.tokens_per_s / shape.gpus, x,
                 s.ttft_p50_s, s.tpot_p50_s)  # fmt: skip


def rate_matched(
    isl: int, osl: int, context: Mapping[int, Sequence[ContextPoint]], generation: Mapping[int, Sequence[GenerationPoint]],
    ttft_bound_s: float,
) -> list[Point]:  # fmt: skip
    """For each generation tp and level, the best context tp at its ideal ratio."""
    capacity = {tp: context_capacity(levels, ttft_bound_s) for tp, levels in context.items()}
    points = []
    for tp_g, levels in generation.items():
        for lv in levels:
            best: Point | None = None
            for tp_c, rate in capacity.items():
                if rate <= 0:
                    continue
                x = lv.tokens_per_s / (osl * rate)
                per_gpu = lv.tokens_per_s / (tp_g + x * tp_c)
                shape = Shape(
                    generation=1, generation_tp=tp_g, context=1, context_tp=tp_c, max_batch_size=lv.concurrency
                )
                point = Point("rate-matched", shape, lv.concurrency, lv.tokens_per_s_per_user, per_gpu, x)
                if best is None or point.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu:
                    best = point
            if best is not None:
                points.append(best)
    return points


def whole_engines(x: float, max_generation: int = 4, tolerance: float = 0.1) -> tuple[int, int]:
    """(c, g): the fewest whole context and generation engines whose ratio c/g is within
    `tolerance` of x (relative), else the closest ratio with up to `max_generation`."""
    options = [(max(1, round(g * x)), g) for g in range(1, max_generation + 1)]
    close = [cg for cg in options if abs(cg[0] / cg[1] - x) / x <= tolerance]
    if close:
        return min(close, key=lambda cg: cg[0] + cg[1])
    return min(options, key=lambda cg: (abs(cg[0] / cg[1] - x) / x, cg[0] + cg[1]))


def frontier(points: Iterable[Point]) -> list[Point]:
    """Points no other beats on both tokens/s/user and tokens/s/GPU, by tokens/s/user ascending."""
    pts = sorted(points, key=lambda p: (p.tokens_per_s_per_user, p.tokens_per_s_per_gpu), reverse=True)
    out: list[Point] = []
    best = -1.0
    for p in pts:
        if p.tokens_per_s_per_gpu > best:
            out.append(p)
            best = p.tokens_per_s_per_gpu
    return sorted(out, key=lambda p: p.tokens_per_s_per_user)


def at_user_speed(front: Sequence[Point], per_user: float) -> float | None:
    """Tokens/s per GPU a frontier reaches at `per_user` tokens/s/user: linear between its
    points (a deployment between two measured loads), its slowest point's throughput below
    them (serving users faster than they need is allowed), None beyond its fastest point."""
    if not front or per_user > front[-1].tokens_per_s_per_user:
        return None
    if per_user <= front[0].tokens_per_s_per_user:
        return front[0].tokens_per_s_per_gpu
    for a, b in zip(front, front[1:]):
        if a.tokens_per_s_per_user <= per_user <= b.tokens_per_s_per_user:
            span = b.tokens_per_s_per_user - a.tokens_per_s_per_user
            share = (per_user - a.tokens_per_s_per_user) / span if span else 0.0
            return a.tokens_per_s_per_gpu + share * (b.tokens_per_s_per_gpu - a.tokens_per_s_per_gpu)
    return None  # unreachable: the frontier is sorted by tokens/s/user
