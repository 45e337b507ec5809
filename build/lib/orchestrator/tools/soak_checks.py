"""How a soak is judged: what one request's outcome was, the server's state (memory,
processes, gauges) and the checks that turn both into the soak's report.

Split from orchestrator/tools/soak.py (the command) so the promises a soak checks can be read, and
tested against made-up outcomes, apart from the client that produces them.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from orchestrator.telemetry.gauges import HOLDING
from orchestrator.tools.metrics import gauges as metric_gauges
from orchestrator.tools.metrics import samples as metric_samples
from orchestrator.tools.soak_plan import Key, Plan
from orchestrator.tools.stacks import process_tree

# What injected faults and stops may legitimately end a request with; anything else is a bug.
EXPECTED_ERROR_CODES = ("UNAVAILABLE", "CANCELLED")
# A mid-stream engine failure that ended the request instead of migrating it (max_migrations=0's wording).
NOT_MIGRATED = "(after tokens were streamed: not retried)"
MIGRATIONS_METRIC = "disagg_orchestrator_migrations_total"
ENSEMBLE_PREFIX = "in ensemble 'ensemble', "
# The python backend stub's own race (README, "Facts about Triton"): logged, harmless.
BENIGN_LOG_TRACEBACKS = ("Cannot remove future from background",)


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as received. `kind`: ok (a normal final) | error | hung (no
    final within the request timeout). Whether a stop cut it short is decided later,
    against the completions of the same inputs (`classify`)."""

    plan: Plan
    kind: str
    code: str  # the error's code word (kind == "error")
    message: str
    text: str  # the completion text received (deltas joined)
    latency_s: float
    stop_sent: str  # "" | "before_final" | "after_final"
    problems: tuple[str, ...]  # broken promises seen on this request (each fails the soak)


def error_code(message: str) -> str:
    """The code word an error message starts with (gRPC streams carry no status code)."""
    text = message.removeprefix(ENSEMBLE_PREFIX)
    match = re.match(r"([A-Z][A-Z_]+):", text)
    return match[1] if match else "UNTYPED"


# --------------------------------------------------------------------------- server state


def process_rss_mib(pid: int) -> dict[str, float]:
    """VmRSS of `pid` and each descendant by name (same names summed): what the server
    holds, stubs included; the sum is the soak's memory figure, the parts say who grew."""
    by_name: dict[str, float] = {}
    for p, name in process_tree(pid).items():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    by_name[name] = by_name.get(name, 0.0) + int(line.split()[1]) / 1024
    return by_name


def _exit_note(pid: int) -> str:
    """How a dead, not yet reaped process ended (its zombie still holds the status)."""
    try:
        status = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[-1])
    except (OSError, ValueError, IndexError):
        return "gone"
    if status & 0x7F:
        try:
            return f"killed by {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"killed by signal {status & 0x7F}"
    return f"exited with {status >> 8}"


class ServerWatch:
    """Notices a server process (tritonserver or a stub) dying during the load, so the soak
    stops at once instead of letting every in-flight request run into its timeout."""

    def __init__(self, pid: int | None, event: threading.Event, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.start = process_tree(pid) if pid else {}
        self.died: dict[int, str] = {}  # pid -> "name (pid N, how it ended)"
        self.event = event  # set when something died
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="soak-watch")
        if pid:
            self._thread.start()

    def check(self) -> dict[int, str]:
        if self.pid:
            now = process_tree(self.pid)
            for p, name in self.start.items():
                if p not in now and p not in self.died:
                    self.died[p] = f"{name} (pid {p}, {_exit_note(p)})"
            if self.died:
                self.event.set()
        return self.died

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s) and not self.check():
            pass

    def close(self) -> dict[int, str]:
        self._stop.set()
        return self.check()


def expected_gauges(engines: Sequence[str], orchestrator: str = "orchestrator") -> set[str]:
    """The holding gauges a soak repository must publish, keyed as `orchestrator.tools.metrics.gauges`
    keys them (`name{model}`): a missing one could not prove that nothing is held."""
    keys = set()
    for name in HOLDING:
        models = engines if name.startswith("disagg_engine_") else (orchestrator,)
        keys |= {f"{name}{{{m}}}" for m in models}
    return keys


def migration_counts(metrics: str) -> dict[str, float] | None:
    """`disagg_orchestrator_migrations_total` summed by outcome (the orchestrator flushed it
    when each request ended, before the gauges read 0); None when the endpoint is gone."""
    try:
        scraped = metric_samples(metrics, prefix=MIGRATIONS_METRIC)
    except OSError:
        return None
    counts: dict[str, float] = {}
    for _, labels, value in scraped:
        outcome = labels.get("outcome", "")
        counts[outcome] = counts.get(outcome, 0.0) + value
    return counts


def wait_gauges_zero(metrics: str, expected: set[str], deadline_s: float) -> tuple[float, dict[str, float]]:
    """Poll until every holding gauge reads 0 twice in a row, more than a sampling interval
    apart (a leak stays non-zero). Returns (seconds waited, what was non-zero or missing at
    the deadline)."""
    start = time.monotonic()
    zero_since: float | None = None
    while True:
        try:
            values = {k: v for k, v in metric_gauges(metrics).items() if k.split("{")[0] in HOLDING}
            bad = {k: v for k, v in values.items() if v != 0}
            bad.update({k: math.nan for k in expected - values.keys()})
            if not values:
                bad["<no disagg holding gauges on the metrics endpoint>"] = math.nan
        except OSError as exc:  # requests' errors are OSErrors too
            bad = {f"<metrics endpoint unreachable: {exc}>": math.nan}
        now = time.monotonic()
        if bad:
            zero_since = None
        elif zero_since is None:
            zero_since = now
        elif now - zero_since >= 0.3:  # gauges are sampled every 100 ms
            return now - start, {}
        if now - start > deadline_s:
            return now - start, bad
        time.sleep(0.1)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SoakReport:
    """The soak's figures; `failures` empty means every check passed."""

    requests_planned: int
    requests_sent: int
    concurrency: int
    duration_s: float
    requests_per_s: float
    outcomes: dict[str, int]  # ok, stopped, hung, error:<CODE>
    stops_sent: dict[str, int]  # before_final, after_final
    error_samples: dict[str, str]  # one message per error code
    error_kinds: dict[str, int]  # error messages with names and numbers blanked, counted
    latency_p50_s: float
    latency_p99_s: float
    rss_warm_mib: float | None
    rss_end_mib: float | None
    rss_growth_mib: float | None
    max_rss_growth_mib: float
    rss_growth_by_process_mib: dict[str, float]  # where the growth is (tritonserver, each stub)
    leak_wait_s: dict[str, float]  # how long the gauges took to reach 0: warmup, end
    leaked: dict[str, float]  # gauges still non-zero at the deadline
    migrations: dict[str, float] | None  # requests migrated mid-stream, by how they ended (None: no metrics)
    server_log: str | None  # the server's log file (own server only)
    failures: list[str]

    def summary(self) -> str:
        def mib(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f} MiB"

        waits = ", ".join(f"{k} {v:.1f}s" for k, v in self.leak_wait_s.items())
        lines = [
            f"requests   {self.requests_sent}/{self.requests_planned} sent, concurrency {self.concurrency}, "
            f"{self.duration_s:.1f}s, {self.requests_per_s:.1f} req/s",
            "outcomes   " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            "stops      " + (", ".join(f"{k}={v}" for k, v in sorted(self.stops_sent.items())) or "none"),
            f"latency    p50 {self.latency_p50_s * 1e3:.0f} ms, p99 {self.latency_p99_s * 1e3:.0f} ms (completed requests)",
            f"rss        after warm-up {mib(self.rss_warm_mib)}, at end {mib(self.rss_end_mib)}, "
            f"growth {mib(self.rss_growth_mib)} (bound {self.max_rss_growth_mib:g} MiB)"
            + (" = " + ", ".join(f"{k} {v:+.1f}" for k, v in sorted(self.rss_growth_by_process_mib.items()))
               if self.rss_growth_by_process_mib else ""),
            "migrations " + ("not read" if self.migrations is None else ", ".join(
                f"{k}={v:g}" for k, v in sorted(self.migrations.items())) or "none"),
            "leaks      " + (f"NON-ZERO: {self.leaked}" if self.leaked
                             else f"none: every holding gauge back at 0 after {waits}" if waits else "not checked"),
        ]  # fmt: skip
        lines.extend(f"error      {count:5d} x {kind}" for kind, count in list(self.error_kinds.items())[:8])
        lines.extend(f"example    {code}: {message[:240]}" for code, message in sorted(self.error_samples.items()))
        if self.server_log:
            lines.append(f"server log {self.server_log}")
        lines.append("result     " + ("PASS" if not self.failures else f"FAIL ({len(self.failures)} failed checks)"))
        lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)


def error_kind(message: str) -> str:
    """An error message with quoted names and numbers blanked, so errors group by cause."""
    text = re.sub(r"'[^']*'", "'…'", message.removeprefix(ENSEMBLE_PREFIX))
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def references(outcomes: Sequence[Outcome]) -> dict[Key, str]:
    """The completion of each set of inputs, from a request that no stop could have cut."""
    refs: dict[Key, str] = {}
    for o in outcomes:
        if o.kind == "ok" and o.stop_sent != "before_final":
            refs.setdefault(o.plan.key, o.text)
    return refs


def classify(o: Outcome, refs: Mapping[Key, str]) -> str:
    """ok | stopped | hung | error:<CODE>. A request that ended normally after its stop was
    sent counts as stopped unless it still produced the whole completion (the stop came late)."""
    if o.kind == "error":
        return f"error:{o.code}"
    if o.kind == "ok" and o.stop_sent == "before_final" and refs.get(o.plan.key) != o.text:
        return "stopped"
    return o.kind


def check_outcomes(outcomes: Sequence[Outcome], refs: Mapping[Key, str], migrating: bool = False) -> list[str]:
    """The per-request promises, and determinism of the outputs; `migrating`: the server
    migrates requests whose generation engine failed mid-stream (none may end without)."""
    failures: list[str] = []

    def fail(what: str, items: list[str]) -> None:
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            failures.append(f"{len(items)} {what}: " + "; ".join(items[:5]) + more)

    def cut(o: Outcome) -> bool:
        return o.kind == "error" or (o.kind == "ok" and o.stop_sent == "before_final")

    ref_ids: dict[Key, str] = {}  # which request gave each reference (as `references` picks it)
    for o in outcomes:
        if o.kind == "ok" and not cut(o):
            ref_ids.setdefault(o.plan.key, o.plan.request_id)

    fail("requests without a final response (hung)", [
        f"{o.plan.request_id} (stream={o.plan.stream}, max_tokens={o.plan.max_tokens}, "
        f"stop={o.stop_sent or 'none'} at {o.plan.stop_delay_s or 0:.4f}s)"
        for o in outcomes if o.kind == "hung"
    ])  # fmt: skip
    fail(
        "unexpected error kinds",
        [
            f"{o.plan.request_id}: {o.message}"
            for o in outcomes
            if o.kind == "error" and o.code not in EXPECTED_ERROR_CODES
        ],
    )
    fail(
        "error messages with a traceback",
        [f"{o.plan.request_id}: {o.message[:300]}" for o in outcomes if "Traceback" in o.message],
    )
    if migrating:
        fail(
            "mid-stream failures that were not migrated",
            [f"{o.plan.request_id}: {o.message[:300]}" for o in outcomes if NOT_MIGRATED in o.message],
        )
    fail("broken response promises", [f"{o.plan.request_id}: {p}" for o in outcomes for p in o.problems])
    fail("completions that differ from another of the same inputs", [
        f"{o.plan.request_id} (stream={o.plan.stream}) {o.text[:60]!r} != {ref_ids[o.plan.key]} {refs[o.plan.key][:60]!r}"
        for o in outcomes if o.kind == "ok" and not cut(o) and refs[o.plan.key] != o.text
    ])  # fmt: skip
    # A cut may end inside a multi-byte character, rendered as U+FFFD at the final.
    fail("cut-short outputs that are not a prefix of the completion", [
        f"{o.plan.request_id} ({classify(o, refs)}, stream={o.plan.stream}) {o.text[:60]!r} vs "
        f"{ref_ids[o.plan.key]} {refs[o.plan.key][:60]!r}"
        for o in outcomes
        if cut(o) and o.plan.key in refs and not refs[o.plan.key].startswith(o.text.rstrip("\ufffd"))
    ])  # fmt: skip
    return failures


def log_tracebacks(log: str) -> list[str]:
    """Tracebacks in the server log other than the stub's known harmless race."""
    chunks = log.split("Traceback")[1:]
    return [c[:400] for c in chunks if not any(b in c[:2000] for b in BENIGN_LOG_TRACEBACKS)]
