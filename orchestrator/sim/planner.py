"""The SLA planner: which deployment of a GPU budget serves the most requests within the SLOs.

Search (every number from the simulator, nothing from a GPU):
1. phase sweeps per tensor-parallel size (`phase_sweeps.py`): a context engine's capacity
   with TTFT p50 within the TTFT bound, and a generation engine's decode speed per level;
2. candidates: aggregated (budget / tp engines of tp GPUs) for every tp, and disaggregated
   (c context engines of tp_c, g generation engines of tp_g, within the budget), each at
   the levels k (users per generation engine = its max_batch_size, the most it runs at
   once) at the edge of the TPOT bound in the generation sweep: the highest that meets it,
   the one below (two below for aggregated engines, whose prefill chunks slow decoding) and
   the next one up (interference and queueing decide near the edge). Disaggregated shapes are ranked by their
   rate-matched goodput, min(c x capacity, g x tokens/s / OSL), and the best `keep` are
   simulated;
3. each candidate is simulated end to end: a closed loop of k x g users (every batch slot
   taken), then fewer while more than 5% of requests miss an SLO; or the trace replayed at
   its own times. Its goodput is the steady-state requests/s times the share of requests
   meeting every bound; the best goodput per GPU used wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from orchestrator.bench.goodput import Slo
from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint, context_capacity
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.sim.driver import simulate
from orchestrator.sim.pareto import TP_SIZES, requests_for
from orchestrator.sim.requests import SimRequest, from_workload
from orchestrator.sim.shapes import Shape, deployment
from orchestrator.sim.steady import steady, steady_goodput
from orchestrator.sim.study import context_sweeps, generation_sweeps, parallel_map

# A shape is tried with every batch slot of its generation engines taken by a user, then,
# while too many requests miss an SLO (queueing for context or batch slots), with fewer.
LOAD_SHARES = (1.0, 0.75, 0.5, 0.25)
ENOUGH_MET = 0.95


@dataclass(frozen=True, slots=True)
class Candidate:
    """One simulated deployment and what it achieved."""

    shape: Shape
    users: int  # closed-loop users (0: a trace's own arrivals)
    goodput: float  # requests/s within every SLO
    requests_per_s: float
    ttft_p50_s: float | None
    tpot_p50_s: float | None

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.shape.gpus

    def describe(self) -> str:
        ttft = "-" if self.ttft_p50_s is None else f"{self.ttft_p50_s * 1e3:.0f}"
        tpot = "-" if self.tpot_p50_s is None else f"{self.tpot_p50_s * 1e3:.1f}"
        load = f"{self.users} users" if self.users else "the trace"
        return (f"{self.shape.label}, max_batch_size {self.shape.max_batch_size}, {self.shape.gpus} GPUs, {load}: "
                f"goodput {self.goodput:.2f} req/s ({self.goodput_per_gpu:.3f}/GPU), "
                f"{self.requests_per_s:.2f} req/s, TTFT p50 {ttft} ms, TPOT p50 {tpot} ms")  # fmt: skip


def _tpot_levels(levels: Sequence[GenerationPoint], slo: Slo, below: int = 1) -> list[int]:
    """The highest level meeting the TPOT bound, `below` more under it, and the next one up
    (no TPOT bound: every level). Aggregated engines look further down (`below`): their
    prefill chunks slow every decode, which a generation-only sweep does not see."""
    ks = [lv.concurrency for lv in levels]
    if slo.tpot_ms is None:
        return ks
    ok = [lv.concurrency for lv in levels if 1e3 / max(lv.tokens_per_s_per_user, 1e-9) <= slo.tpot_ms]
    if not ok:
        return ks[:1]
    above = [k for k in ks if k > max(ok)]
    return sorted({*ok[-1 - below :], *above[:1]})


def disaggregated_candidates(
    gpus: int, osl: int, slo: Slo, context: dict[int, list[ContextPoint]], generation: dict[int, list[GenerationPoint]],
    keep: int,
) -> list[tuple[Shape, float]]:  # fmt: skip
    """The `keep` best disaggregated (shape, rate-matched goodput per GPU) within the budget."""
    ttft_bound = slo.ttft_ms / 1e3 if slo.ttft_ms is not None else float("inf")
    ranked: dict[Shape, float] = {}
    for tp_c, c_levels in context.items():
        rate = context_capacity(c_levels, ttft_bound)
        if rate <= 0:
            continue
        for tp_g, g_levels in generation.items():
            by_k = {lv.concurrency: lv for lv in g_levels}
            for k in _tpot_levels(g_levels, slo):
                for c in range(1, gpus // tp_c + 1):
                    for g in range(1, (gpus - c * tp_c) // tp_g + 1):
                        served = min(c * rate, g * by_k[k].tokens_per_s / osl)
                        shape = Shape(generation=g, generation_tp=tp_g, context=c, context_tp=tp_c, max_batch_size=k)
                        ranked[shape] = served / shape.gpus
    best = sorted(ranked.items(), key=lambda item: (-item[1], item[0].gpus))
    return best[:keep]


def _evaluate(args: tuple[Shape, int, int, Slo, tuple[SimRequest, ...] | None]) -> Candidate:
    shape, isl, osl, slo, trace = args
    d = deployment(shape, max(isl, max((r.input_tokens for r in trace or ()), default=0)))
    if trace:
        run = simulate(d, list(trace), None, slo=slo)
        s = run.summary
        return Candidate(shape, 0, s.goodput_requests_per_s or 0.0, s.requests_per_s, s.ttft_p50_s, run.tpot_p50_s)
    best: Candidate | None = None
    full = shape.max_batch_size * shape.generation
    for share in LOAD_SHARES:
        users = max(1, round(full * share))
        workload = Workload(LengthDist("fixed", isl), LengthDist("fixed", osl))
        run = simulate(d, from_workload(workload, requests_for(users), salt=f"plan-{shape.name}"), users, slo=slo)
        st = steady(run.results, users)
        good = steady_goodput(run.results, users, slo)
        found = Candidate(shape, users, good, st.requests_per_s, st.ttft_p50_s, st.tpot_p50_s)
        if best is None or found.goodput > best.goodput:
            best = found
        if good >= ENOUGH_MET * st.requests_per_s:
            break  # fewer users would only lower the rate
    assert best is not None
    return best


def plan(
    isl: int, osl: int, slo: Slo, gpus: int, trace: Sequence[SimRequest] | None = None, keep: int = 6,
    workers: int | None = None, tp_sizes: Sequence[int] = TP_SIZES,
) -> list[Candidate]:  # fmt: skip
    """Every simulated candidate, best goodput per GPU first (see the module docstring)."""
    sizes = [tp for tp in tp_sizes if tp <= gpus]
    if not sizes:
        raise ValueError(f"a budget of {gpus} GPUs fits no engine of tensor-parallel size in {list(tp_sizes)}")
    ctx = dict(parallel_map(context_sweeps, [(tp, isl) for tp in sizes], workers or 2))
    gen = dict(parallel_map(generation_sweeps, [(tp, isl, osl) for tp in sizes], workers or 2))
    shapes = [shape for shape, _ in disaggregated_candidates(gpus, osl, slo, ctx, gen, keep)]
    for tp in sizes:
        n = gpus // tp
        shapes += [Shape(generation=n, generation_tp=tp, max_batch_size=k) for k in _tpot_levels(gen[tp], slo, below=2)]
    frozen = tuple(trace) if trace else None
    jobs = [(replace(s), isl, osl, slo, frozen) for s in dict.fromkeys(shapes)]
    results = parallel_map(_evaluate, jobs, workers or 2)
    # ties: fewer GPUs, then fewer batch slots (the same goodput with less KV memory promised)
    return sorted(results, key=lambda c: (-c.goodput_per_gpu, c.shape.gpus, c.shape.max_batch_size))
