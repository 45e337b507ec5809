"""Rate matching: how many context engines per generation engine, from per-phase sweeps.

The method (the one disaggregation papers and TensorRT-LLM's own study use): measure the
two phases apart, then combine them on paper.

- A context engine, swept over load, sustains `requests_per_s` at each TTFT it gives;
  under a TTFT bound its capacity is the best rate whose TTFT stays within the bound.
- A generation engine, swept over concurrency k, gives `tokens_per_s` (all its users) and
  `tokens_per_s_per_user` (what each user sees). At OSL output tokens per request it
  finishes `tokens_per_s / OSL` requests a second.
- c context + g generation engines serve `min(c x ctx_rate, g x gen_tokens_per_s / OSL)`
  requests a second; the output tokens that makes, divided by ALL c + g engines, is the
  fair "per GPU" throughput. For each k the best c:g is the one with most tokens/s per
  engine; each (k, c:g) is a point (tokens/s/user, tokens/s/engine), and the Pareto
  frontier keeps the points no other point beats on both.

End-to-end runs land below these points (queueing, transfers, the orchestrator): the
gap is the measurement, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True, slots=True)
class ContextPoint:
    """One load level of a context-only sweep, per context engine."""

    load: float
    requests_per_s: float
    ttft_s: float  # the percentile the bound is about (p50 or p99), chosen by the caller


@dataclass(frozen=True, slots=True)
class GenerationPoint:
    """One concurrency of a generation-only sweep, per generation engine."""

    concurrency: int
    tokens_per_s: float
    tokens_per_s_per_user: float


@dataclass(frozen=True, slots=True)
class RatePoint:
    """A deployment shape at one generation concurrency, as rate matching predicts it."""

    context_engines: int
    generation_engines: int
    concurrency: int
    requests_per_s: float
    tokens_per_s: float
    tokens_per_s_per_engine: float
    tokens_per_s_per_user: float
    bottleneck: str  # "context" or "generation": the side that limits the rate

    @property
    def label(self) -> str:
        return f"c{self.context_engines}g{self.generation_engines}"


def context_capacity(points: Sequence[ContextPoint], ttft_bound_s: float) -> float:
    """Requests/s one context engine sustains with TTFT within the bound (0 if none does)."""
    within = [p.requests_per_s for p in points if p.ttft_s <= ttft_bound_s]
    return max(within, default=0.0)


def combine(
    context_rate: float, gen: GenerationPoint, osl: int, context_engines: int, generation_engines: int
) -> RatePoint:
    """What c context and g generation engines serve together at this generation point."""
    if osl < 1 or context_engines < 1 or generation_engines < 1:
        raise ValueError("osl and both engine counts must be >= 1")
    ctx_side = context_engines * context_rate
    gen_side = generation_engines * gen.tokens_per_s / osl
    rate = min(ctx_side, gen_side)
    tokens = rate * osl
    return RatePoint(
        context_engines=context_engines,
        generation_engines=generation_engines,
        concurrency=gen.concurrency,
        requests_per_s=rate,
        tokens_per_s=tokens,
        tokens_per_s_per_engine=tokens / (context_engines + generation_engines),
        tokens_per_s_per_user=gen.tokens_per_s_per_user,
        bottleneck="context" if ctx_side < gen_side else "generation",
    )


def best_ratios(
    context_rate: float, generation: Sequence[GenerationPoint], osl: int, max_engines: int
) -> list[RatePoint]:
    """For each generation concurrency, the c:g (c + g <= max_engines) with most tokens/s per
    engine; ties go to fewer engines, then to more context engines (headroom for TTFT)."""
    best: list[RatePoint] = []
    for gen in generation:
        candidates = [
            combine(context_rate, gen, osl, c, g)
            for total in range(2, max_engines + 1)
            for c in range(1, total)
            for g in (total - c,)
        ]
        if candidates:
            best.append(
                max(
                    candidates,
                    key=lambda p: (
                        round(p.tokens_per_s_per_engine, 9),
                        -(p.context_engines + p.generation_engines),
                        p.context_engines,
                    ),
                )
            )
    return best


def pareto(points: Iterable[RatePoint]) -> list[RatePoint]:
    """Points not beaten on both tokens/s/user and tokens/s/engine, by tokens/s/user ascending."""
    pts = sorted(points, key=lambda p: (p.tokens_per_s_per_user, p.tokens_per_s_per_engine), reverse=True)
    frontier: list[RatePoint] = []
    best_engine = -1.0
    for p in pts:  # from the most per-user speed down: keep each that raises throughput
        if p.tokens_per_s_per_engine > best_engine:
            frontier.append(p)
            best_engine = p.tokens_per_s_per_engine
    return sorted(frontier, key=lambda p: p.tokens_per_s_per_user)
