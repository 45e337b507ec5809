"""Steady-state figures of a closed loop: what a deployment does once every user is busy.

A closed loop's users all send at once (the first wave queues), and once the last request
is sent the users leave one by one (the rest drain, served faster); both distort a run's
averages, the more so the fewer requests per user. So:

- throughput: the rate of completions between the end of the first wave (the `users`-th
  answer) and the last send; requests start in waves, and a window bounded by completions
  on both sides counts whole ones (with too few requests for one: the whole run);
- what each user sees (tokens/s per user, TTFT, TPOT): every request but the first and the
  last `users`.

Used alike by the phase sweeps, the Pareto study, the planner and `disagg fidelity`, so
served and simulated runs are read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from orchestrator.bench.goodput import Slo, tpot_s
from orchestrator.bench.stats import RequestResult, percentile


@dataclass(frozen=True, slots=True)
class Steady:
    requests_per_s: float
    tokens_per_s: float
    tokens_per_s_per_user: float
    ttft_p50_s: float | None
    tpot_p50_s: float | None


def steady(results: Sequence[RequestResult], users: int) -> Steady:
    """Steady-state figures of a closed loop of `users` (see the module docstring)."""
    ordered = sorted((r for r in results if r.ok), key=lambda r: r.start_s)
    middle = ordered[users : len(ordered) - users] if len(ordered) > 3 * users else ordered
    if len(middle) < 2:
        raise ValueError(f"{len(results)} requests are too few to measure a steady state of {users} users")
    ends = sorted(r.start_s + r.e2e_s for r in ordered)
    first_wave_done, drain_starts = ends[min(users, len(ends)) - 1], ordered[-1].start_s
    window = [end for end in ends if first_wave_done < end <= drain_starts]
    if len(window) >= users and drain_starts > first_wave_done:
        rate = len(window) / (drain_starts - first_wave_done)  # every user busy, ramp and drain left out
    else:  # too few requests for a window: the whole run
        span = ends[-1] - ordered[0].start_s
        rate = len(ordered) / span if span > 0 else float("inf")
    mean_out = sum(r.output_tokens for r in ordered) / len(ordered)
    per_user = [(r.output_tokens - 1) / (r.e2e_s - r.ttft_s) for r in middle
                if r.ttft_s is not None and r.output_tokens > 1 and r.e2e_s > r.ttft_s]  # fmt: skip
    ttfts = [r.ttft_s for r in middle if r.ttft_s is not None]
    tpots = [t for t in (tpot_s(r) for r in middle) if t is not None]
    return Steady(rate, rate * mean_out, sum(per_user) / len(per_user) if per_user else 0.0,
                  percentile(ttfts, 50) if ttfts else None, percentile(tpots, 50) if tpots else None)  # fmt: skip


def steady_goodput(results: Sequence[RequestResult], users: int, slo: Slo) -> float:
    """Steady-state requests/s times the share of steady-state requests meeting every bound."""
    ordered = sorted(results, key=lambda r: r.start_s)
    middle = ordered[users : len(ordered) - users] if len(ordered) > 3 * users else ordered
    return steady(results, users).requests_per_s * sum(slo.meets(r) for r in middle) / len(middle)
