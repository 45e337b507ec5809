"""A soak's verdict: every failure besides leaks, and the report of what the run measured.

Split from orchestrator/tools/soak.py (the command, which runs the load and the leak checks)
so turning a run's measurements into failures and a `SoakReport` reads apart from running
it; the checks it applies are orchestrator/tools/soak_checks.py's.
"""

from __future__ import annotations

from collections import Counter

from orchestrator.tools.launch import TritonServer
from orchestrator.tools.soak_checks import (
    Outcome,
    SoakReport,
    check_outcomes,
    classify,
    error_kind,
    log_tracebacks,
    percentile,
)
from orchestrator.tools.soak_plan import Key


def rss_totals(warm_parts: dict[str, float], end_parts: dict[str, float]) -> tuple[float | None, ...]:
    """The server's RSS after the warm-up, at the end, and the growth between (None where unmeasured)."""
    rss_warm = sum(warm_parts.values()) if warm_parts else None
    rss_end = sum(end_parts.values()) if end_parts else None
    growth = None if rss_warm is None or rss_end is None else rss_end - rss_warm
    return rss_warm, rss_end, growth


def judge(
    outcomes: list[Outcome], refs: dict[Key, str], problems: list[str], died: dict[int, str], migrating: bool,
    rss_warm_parts: dict[str, float], rss_end_parts: dict[str, float], max_rss_growth_mib: float,
    server: TritonServer | None,
) -> list[str]:  # fmt: skip
    """The failures besides leaks, in the report's order: dead processes, outcomes, client
    problems, memory growth, tracebacks in the server log."""
    failures: list[str] = []
    if died:
        failures.append(
            f"server processes died during the soak: {sorted(died.values())}; a dead stub fails or strands every "
            f"request of its model, so the soak stopped after {len(outcomes)} requests"
        )  # fmt: skip
    failures.extend(check_outcomes(outcomes, refs, migrating))
    failures.extend(problems)
    rss_warm, rss_end, growth = rss_totals(rss_warm_parts, rss_end_parts)
    if growth is not None and growth > max_rss_growth_mib:
        failures.append(
            f"server RSS grew {growth:.1f} MiB ({rss_warm:.1f} -> {rss_end:.1f}), bound {max_rss_growth_mib:g} MiB"
        )
    if server is not None:
        found = log_tracebacks(server.log_text())
        if found:
            failures.append(f"{len(found)} tracebacks in the server log; first: {found[0]!r}")
    return failures


def build_report(
    planned: int, concurrency: int, duration: float, outcomes: list[Outcome], refs: dict[Key, str],
    rss_warm_parts: dict[str, float], rss_end_parts: dict[str, float], max_rss_growth_mib: float,
    leak_wait: dict[str, float], leaked: dict[str, float], migrations: dict[str, float] | None,
    server: TritonServer | None, failures: list[str],
) -> SoakReport:  # fmt: skip
    """What the soak measured and found, rounded for reading."""
    samples: dict[str, str] = {}
    for o in outcomes:
        if o.kind == "error":
            samples.setdefault(o.code, o.message)
    latencies = [o.latency_s for o in outcomes if o.kind == "ok"]
    rss_warm, rss_end, growth = rss_totals(rss_warm_parts, rss_end_parts)
    return SoakReport(
        requests_planned=planned,
        requests_sent=len(outcomes),
        concurrency=concurrency,
        duration_s=round(duration, 2),
        requests_per_s=round(len(outcomes) / duration, 2) if duration > 0 else 0.0,
        outcomes=dict(Counter(classify(o, refs) for o in outcomes)),
        stops_sent=dict(Counter(o.stop_sent for o in outcomes if o.stop_sent)),
        error_samples=samples,
        error_kinds=dict(Counter(error_kind(o.message) for o in outcomes if o.kind == "error").most_common()),
        latency_p50_s=round(percentile(latencies, 0.50), 4),
        latency_p99_s=round(percentile(latencies, 0.99), 4),
        rss_warm_mib=None if rss_warm is None else round(rss_warm, 1),
        rss_end_mib=None if rss_end is None else round(rss_end, 1),
        rss_growth_mib=None if growth is None else round(growth, 1),
        max_rss_growth_mib=max_rss_growth_mib,
        rss_growth_by_process_mib={
            k: round(rss_end_parts[k] - rss_warm_parts[k], 1) for k in rss_warm_parts.keys() & rss_end_parts.keys()
        },
        leak_wait_s=leak_wait,
        leaked=leaked,
        migrations=migrations,
        server_log=str(server.log_path) if server is not None and server.log_path else None,
        failures=failures,
    )
