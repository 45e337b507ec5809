"""Bounded soak: thousands of mixed requests, injected engine faults and stops, then proof
that nothing leaked.

    python scripts/soak.py --requests 5000 --concurrency 64 --time-limit 600 [--json report.json]

Why: the per-feature tests send a handful of requests, while leaks and lost final
responses show up only under churn: retries after faults, stops racing completions, KV
leases expiring. The soak drives that churn through the client-facing `ensemble` and
then checks what must hold after any load:

- every request got exactly one final response (a token stream or one error; a stopped
  request an empty final), nothing after it, and no request hung (per-request timeout);
- errors are only the kinds faults and stops may cause (UNAVAILABLE, CANCELLED) and no
  message carries a Python traceback;
- completed outputs are deterministic: every completion of the same prompt and sampling
  inputs is the same text, streamed or not, and a cut-short stream is a prefix of it;
- afterwards every `disagg_*` gauge (requests, child requests, leases, KV blocks, pending
  stops) returns to 0, both after the warm-up and at the end;
- the server's resident memory (tritonserver plus its python backend stubs) grows by at
  most `--max-rss-growth-mib` between the end of the warm-up and the end of the run.

Without `--repository` and `--url` it derives a repository from `model_repository/` with
a different fault on every engine (see `default_faults`), short engine timeouts so
injected hangs end, and 2 s KV lease expiry, and starts its own tritonserver on free
loopback ports. With `--url` it drives a running server instead; the gauges are read from
`--metrics-url` and memory from `--server-pid`, each check skipped when not given.

The exit status is 0 only when every check passed; `run_soak()` is the same run
in-process (the CI soak in tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `scripts` and `orchestrator` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from orchestrator.tokenizer import WORDS  # noqa: E402
from scripts.client import ensemble_inputs  # noqa: E402
from scripts.launch import DEFAULT_REPOSITORY, TritonServer  # noqa: E402
from scripts.repository import ModelSpec, derive  # noqa: E402

MODEL = "ensemble"
FRONTEND_MODELS = ("ensemble", "preprocessing", "orchestrator", "postprocessing")
CONTEXT_ENGINES = ("context_0", "context_1")
GENERATION_ENGINES = ("generation_0", "generation_1")
ENGINE_GAUGES = ("active_requests", "leases", "kv_blocks_in_use", "kv_blocks_reserved")
ORCHESTRATOR_GAUGES = ("in_flight_requests", "child_requests", "stops_pending")
# What injected faults and stops may legitimately end a request with; anything else is a bug.
EXPECTED_ERROR_CODES = ("UNAVAILABLE", "CANCELLED")
ENSEMBLE_PREFIX = "in ensemble 'ensemble', "
# The python backend stub's own race (README, "Facts about Triton"): logged, harmless.
BENIGN_LOG_TRACEBACKS = ("Cannot remove future from background",)


# --------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class Fault:
    """One engine's injected fault: `kind` on `rate` of the requests of `phase`."""

    engine: str
    kind: str
    rate: float
    phase: str = "any"

    def parameters(self) -> dict[str, str]:
        return {"fault": self.kind, "fault_rate": f"{self.rate:g}", "fault_phase": self.phase}


def default_faults(rate: float) -> tuple[Fault, ...]:
    """A different fault per engine, so one soak covers every recovery path at once:

    - context_0 crashes before its response: the context phase is retried elsewhere;
    - context_1 drops its KV lease: the generation pull finds nothing (NOT_FOUND) and the
      context phase runs again;
    - generation_0 crashes after 2 generated tokens: a streamed request ends UNAVAILABLE
      (the client-visible fault), its blocks freed mid-stream;
    - generation_1 hangs (at a fifth of the rate, each costs `engine_timeout_s`): the
      orchestrator times the attempt out, stops the silent child and retries.
    """
    return (
        Fault("context_0", "crash", rate, "context"),
        Fault("context_1", "drop_lease", rate, "context"),
        Fault("generation_0", "crash", rate, "generation"),
        Fault("generation_1", "hang", rate / 5, "generation"),
    )


def parse_fault(text: str) -> Fault:
    """`ENGINE=KIND[@RATE]` from the command line (rate defaults to --fault-rate later)."""
    match = re.fullmatch(r"(\w+)=(\w+)(?:@([0-9.]+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--fault wants ENGINE=KIND[@RATE], e.g. generation_0=fail@0.1, got {text!r}")
    return Fault(match[1], match[2], float(match[3]) if match[3] else -1.0)


def soak_repository(dest: Path, faults: Sequence[Fault], engine_timeout_s: float = 2.0) -> Path:
    """Derive the soak's repository: the full ensemble, faults injected, short timeouts.

    `engine_timeout_s` ends hung attempts; the short breaker backoff keeps a faulty engine
    in rotation (its faults are per request, not permanent); 2 s lease expiry bounds how
    long an unpulled prefill may legitimately hold KV blocks after the load.
    """
    by_engine = {f.engine: f for f in faults}
    unknown = set(by_engine) - set(CONTEXT_ENGINES + GENERATION_ENGINES)
    if unknown:
        raise ValueError(f"faults name engines the soak repository does not have: {sorted(unknown)}")
    models: dict[str, ModelSpec] = {name: ModelSpec(name) for name in FRONTEND_MODELS}
    models["orchestrator"] = ModelSpec("orchestrator", {
        "engine_timeout_s": f"{engine_timeout_s:g}",
        "max_retries": "2",
        "breaker_backoff_s": "0.2",
        "breaker_backoff_max_s": "2",
    })  # fmt: skip
    for engine in CONTEXT_ENGINES + GENERATION_ENGINES:
        params = {"kv_lease_timeout_s": "2"}
        if engine in by_engine:
            params.update(by_engine[engine].parameters())
        models[engine] = ModelSpec(engine, params)
    return derive(dest, models, DEFAULT_REPOSITORY)


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Plan:
    """One request of the workload, decided up front from the seed (reproducible runs)."""

    request_id: str
    prompt: str
    max_tokens: int
    stream: bool
    stop_words: tuple[str, ...]
    stop_delay_s: float | None  # send stop=true this long after the request; None: never

    @property
    def key(self) -> tuple[str, int, tuple[str, ...]]:
        """Requests with the same key must complete with the same text (the stub is deterministic)."""
        return (self.prompt, self.max_tokens, self.stop_words)


SPECIAL_PROMPTS = (
    "héllo wörld, naïve café: the crème brûlée was très bien, héllo wörld",
    "party time 🎉👍🏽 then more 🎉 and 🚀🚀 and 👍🏽🎉 party time",
    "你好世界，今天天气很好。我们去公园散步吧，你好世界",
)


def make_prompts(rng: random.Random, count: int) -> list[str]:
    """Prompts of mixed length (a few words to ~1500 tokens) that repeat phrases, so the
    stub's induction-head model continues them; some share a long prefix (prefix reuse)."""
    shared = " ".join(rng.choice(WORDS) for _ in range(400))
    prompts = list(SPECIAL_PROMPTS)
    while len(prompts) < count:
        phrase = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        size = rng.choice((rng.randint(4, 30), rng.randint(4, 30), rng.randint(40, 300), rng.randint(400, 1400)))
        words = (phrase * (size // len(phrase) + 1))[:size]
        text = " ".join(words)
        prompts.append(f"{shared} {text}" if rng.random() < 0.2 else text)
    return prompts


def make_plans(count: int, seed: int, cancel_rate: float, prompt_pool: int = 48) -> list[Plan]:
    rng = random.Random(seed)
    prompts = make_prompts(rng, prompt_pool)
    stop_word_sets: tuple[tuple[str, ...], ...] = ((), (), (), (), ("the",), (" and", " of"))
    plans = []
    for i in range(count):
        delay = None
        if rng.random() < cancel_rate:
            # Mostly mid-request; the long tail lands after completion (must be harmless).
            delay = rng.uniform(0.0, 0.4) if rng.random() < 0.7 else rng.uniform(0.4, 3.0)
        plans.append(Plan(
            request_id=f"soak{seed}-{i:06d}",
            prompt=rng.choice(prompts),
            max_tokens=rng.choice((1, 4, 8, 16, 16, 32, 32, 64)),
            stream=rng.random() < 0.5,
            stop_words=rng.choice(stop_word_sets),
            stop_delay_s=delay,
        ))  # fmt: skip
    return plans


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Outcome:
    """How one request ended. `kind`: ok | stopped | error | timeout."""

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


def _text(result: grpcclient.InferResult) -> str:
    arr = result.as_numpy("text_output")
    return "" if arr is None else b"".join(arr.reshape(-1)).decode("utf-8", errors="replace")


def _is_final(result: grpcclient.InferResult) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def _close_stream(client: grpcclient.InferenceServerClient, timeout_s: float, cancel: bool = False) -> bool:
    """Half-close a stream and wait for the server to end it, which it does only once every
    request sent on it is complete; returns False if that did not happen in time."""
    done = threading.Event()

    def close() -> None:
        with contextlib.suppress(Exception):
            client.stop_stream(cancel_requests=cancel)
            client.close()
        done.set()

    threading.Thread(target=close, daemon=True, name="soak-close").start()
    return done.wait(timeout_s)


class StopChannel:
    """One stream shared by every worker for `stop=true` requests. A stop's reply carries
    its request id, and each id is stopped at most once, so replies are told apart by id;
    an error on this stream has no id, but any error here is already a failure."""

    def __init__(self, url: str) -> None:
        self._client = grpcclient.InferenceServerClient(url)
        self._lock = threading.Lock()
        self._replies: dict[str, list[tuple[bool, str]]] = {}
        self._done: dict[str, threading.Event] = {}
        self.errors: list[str] = []
        self._client.start_stream(callback=self._on_response)

    def _on_response(self, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        with self._lock:
            if error is not None or result is None:
                self.errors.append(error.message() if error is not None else "empty callback")
                return
            rid = result.get_response().id
            self._replies.setdefault(rid, []).append((_is_final(result), _text(result)))
            event = self._done.get(rid)
        if event is not None and _is_final(result):
            event.set()

    def send(self, request_id: str) -> None:
        with self._lock:
            self._done[request_id] = threading.Event()
            self._client.async_stream_infer(
                MODEL, ensemble_inputs("", 1, stop=True), request_id=request_id, enable_empty_final_response=True
            )

    def wait(self, request_id: str, timeout_s: float) -> list[str]:
        """Problems with this stop's reply: it must be exactly one empty final response."""
        if not self._done[request_id].wait(timeout_s):
            return [f"stop request got no final response within {timeout_s:g}s"]
        with self._lock:
            replies = list(self._replies.get(request_id, ()))
        problems = []
        if [final for final, _ in replies] != [True]:
            problems.append(f"stop request got {len(replies)} responses, finals {[f for f, _ in replies]}; want one final")
        if any(text for _, text in replies):
            problems.append(f"stop request's response carries text {[t for _, t in replies]!r}")
        return problems

    def close(self, timeout_s: float) -> list[str]:
        problems = [f"error on the stop stream: {e}" for e in self.errors]
        if not _close_stream(self._client, timeout_s):
            problems.append("the stop stream did not end after its last stop: the server holds a stop request")
        with self._lock:
            extra = {rid: len(r) for rid, r in self._replies.items() if len(r) != 1}
        problems.extend(f"stop request {rid} got {n} responses" for rid, n in extra.items())
        return problems


@dataclass
class _Shared:
    """What the worker threads share: the plans to take, the results, the bounds."""

    url: str
    plans: Iterator[Plan]
    stops: StopChannel
    send_deadline: float  # monotonic: no new request after this
    request_timeout_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one request
    on_outcome: Callable[[int], None] | None = None

    def take(self) -> Plan | None:
        with self.lock:
            if time.monotonic() >= self.send_deadline:
                return None
            return next(self.plans, None)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            done = len(self.outcomes)
        if self.on_outcome is not None:
            self.on_outcome(done)


class Worker:
    """One gRPC stream carrying one request at a time. A stream's errors have no request id,
    so one-at-a-time is what lets an error be attributed; a response that arrives after
    its request's final shows up as a stray (another id, or left over at the end)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.client = grpcclient.InferenceServerClient(shared.url)
        self.responses: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.poisoned = False  # a request timed out: later responses cannot be attributed

    def run(self) -> None:
        try:
            while not self.poisoned and (plan := self.shared.take()) is not None:
                self.shared.record(self.serve(plan))
        finally:
            self.finish()

    def serve(self, plan: Plan) -> Outcome:
        stops = self.shared.stops
        start = time.monotonic()
        deadline = start + self.shared.request_timeout_s
        stop_at = None if plan.stop_delay_s is None else start + plan.stop_delay_s
        stop_sent = ""
        problems: list[str] = []
        texts: list[str] = []
        self.client.async_stream_infer(
            MODEL,
            ensemble_inputs(plan.prompt, plan.max_tokens, stream=plan.stream, exclude_input_in_output=True,
                            **({"stop_words": list(plan.stop_words)} if plan.stop_words else {})),
            request_id=plan.request_id,
            enable_empty_final_response=True,
        )  # fmt: skip
        kind, code, message = "", "", ""
        while not kind:
            now = time.monotonic()
            if stop_at is not None and not stop_sent and now >= stop_at:
                stops.send(plan.request_id)
                stop_sent = "before_final"
            wake = deadline if stop_at is None or stop_sent else min(deadline, stop_at)
            try:
                result, error = self.responses.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    kind = "timeout"
                    message = f"no final response within {self.shared.request_timeout_s:g}s"
                    self.poisoned = True
                continue
            if error is not None or result is None:
                kind, message = "error", error.message() if error is not None else "empty callback"
                code = error_code(message)
                continue
            rid = result.get_response().id
            if rid != plan.request_id:
                self._stray(f"a response for request {rid!r} arrived after its final (during {plan.request_id})")
                continue
            texts.append(_text(result))
            if _is_final(result):
                kind = "stopped" if stop_sent and texts[-1] == "" else "ok"
        latency = time.monotonic() - start
        if stop_at is not None and not stop_sent:
            stops.send(plan.request_id)  # its delay outlived the request: a stop after the final
            stop_sent = "after_final"
        if stop_sent:
            problems.extend(stops.wait(plan.request_id, timeout_s=10.0))
        if not self.poisoned:
            self._drain(plan.request_id)
        return Outcome(plan, kind, code, message, "".join(texts), latency, stop_sent, tuple(problems))

    def _drain(self, request_id: str) -> None:
        """Whatever is already queued after a final is a response after the final."""
        while True:
            try:
                result, error = self.responses.get_nowait()
            except queue.Empty:
                return
            what = error.message() if error is not None else f"response for {result.get_response().id!r}"
            self._stray(f"after the final of {request_id}: {what}")

    def _stray(self, problem: str) -> None:
        with self.shared.lock:
            self.shared.problems.append(problem)

    def finish(self) -> None:
        if self.poisoned:  # the server still owes a response: cancel rather than wait forever
            _close_stream(self.client, 10.0, cancel=True)
            return
        if not _close_stream(self.client, 30.0):
            self._stray("a worker stream did not end after its last final: the server still holds a request on it")
        self._drain("the stream's last request")


def run_load(url: str, plans: Sequence[Plan], concurrency: int, stops: StopChannel, send_deadline: float,
             request_timeout_s: float, on_outcome: Callable[[int], None] | None = None) -> tuple[list[Outcome], list[str]]:
    """Run `plans` on `concurrency` worker streams until they run out or the send deadline."""
    shared = _Shared(url, iter(plans), stops, send_deadline, request_timeout_s, on_outcome=on_outcome)
    threads = [
        threading.Thread(target=Worker(shared).run, name=f"soak-worker-{i}", daemon=True)
        for i in range(min(concurrency, len(plans)))
    ]
    for t in threads:
        t.start()
    # A worker's wait is bounded (request timeout, stream close), so this join is too.
    join_by = time.monotonic() + max(0.0, send_deadline - time.monotonic()) + request_timeout_s + 60.0
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    problems = list(shared.problems)
    if any(t.is_alive() for t in threads):
        problems.append("a worker thread did not finish: a client wait was not bounded")
    return list(shared.outcomes), problems


# --------------------------------------------------------------------------- server state


def process_tree_rss_mib(pid: int) -> float:
    """VmRSS of `pid` and all its descendants (the python backend stubs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry.name))
    total_kib, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, ()))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


GAUGE_LINE = re.compile(r'^(disagg_\w+)\{([^}]*)\}\s+(\S+)$', re.MULTILINE)


def read_gauges(metrics_url: str) -> dict[str, float]:
    """Every disagg_* series on the metrics endpoint, as 'name{model="..."}' -> value."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return {f"{m[1]}{{{m[2]}}}": float(m[3]) for m in GAUGE_LINE.finditer(text)}


def expected_gauges(engines: Sequence[str], orchestrator: str = "orchestrator") -> set[str]:
    series = {f'disagg_engine_{g}{{model="{e}"}}' for e in engines for g in ENGINE_GAUGES}
    return series | {f'disagg_orchestrator_{g}{{model="{orchestrator}"}}' for g in ORCHESTRATOR_GAUGES}


def wait_gauges_zero(metrics_url: str, expected: set[str], deadline_s: float) -> tuple[float, dict[str, float]]:
    """Poll until every gauge reads 0 twice in a row, a sampling interval apart (a leak stays
    non-zero). Returns (seconds waited, the non-zero or missing series at the deadline)."""
    start = time.monotonic()
    zero_since: float | None = None
    bad: dict[str, float] = {}
    while True:
        try:
            gauges = read_gauges(metrics_url)
            bad = {k: v for k, v in gauges.items() if v != 0}
            bad.update({k: math.nan for k in expected - gauges.keys()})  # missing: cannot prove zero
            if not gauges:
                bad["<no disagg_* gauges on the metrics endpoint>"] = math.nan
        except (urllib.error.URLError, OSError) as exc:
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
    outcomes: dict[str, int]  # ok, stopped, timeout, error:<CODE>
    stops_sent: dict[str, int]  # before_final, after_final
    error_samples: dict[str, str]  # one message per error code
    latency_p50_s: float
    latency_p99_s: float
    rss_warm_mib: float | None
    rss_end_mib: float | None
    rss_growth_mib: float | None
    max_rss_growth_mib: float
    leak_wait_s: dict[str, float]  # how long the gauges took to reach 0: warmup, end
    leaked: dict[str, float]  # gauges still non-zero at the deadline
    log_tracebacks: int | None  # unexplained tracebacks in the server log (own server only)
    failures: list[str]

    def summary(self) -> str:
        def mib(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f} MiB"

        lines = [
            f"requests   {self.requests_sent}/{self.requests_planned} sent, concurrency {self.concurrency}, "
            f"{self.duration_s:.1f}s, {self.requests_per_s:.1f} req/s",
            "outcomes   " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            "stops      " + ", ".join(f"{k}={v}" for k, v in sorted(self.stops_sent.items())),
            f"latency    p50 {self.latency_p50_s * 1e3:.0f} ms, p99 {self.latency_p99_s * 1e3:.0f} ms (completed requests)",
            f"rss        after warm-up {mib(self.rss_warm_mib)}, at end {mib(self.rss_end_mib)}, "
            f"growth {mib(self.rss_growth_mib)} (bound {self.max_rss_growth_mib:g} MiB)",
            "leaks      " + ("none; gauges at 0 after " + ", ".join(f"{k} {v:.1f}s" for k, v in self.leak_wait_s.items())
                             if not self.leaked else f"NON-ZERO: {self.leaked}"),
        ]  # fmt: skip
        for code, message in sorted(self.error_samples.items()):
            lines.append(f"error      {code}: {message[:200]}")
        lines.append("result     " + ("PASS" if not self.failures else f"FAIL ({len(self.failures)} failed checks)"))
        lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def check_outcomes(outcomes: Sequence[Outcome]) -> list[str]:
    """The per-request promises, and determinism of completed outputs."""
    failures: list[str] = []

    def fail(what: str, items: list[str]) -> None:
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            failures.append(f"{len(items)} {what}: " + "; ".join(items[:5]) + more)

    fail("requests without a final response (hung)",
         [f"{o.plan.request_id} (stream={o.plan.stream}, stop={o.stop_sent or 'no'})" for o in outcomes if o.kind == "timeout"])
    fail("unexpected error kinds",
         [f"{o.plan.request_id}: {o.message}" for o in outcomes if o.kind == "error" and o.code not in EXPECTED_ERROR_CODES])
    fail("error messages with a traceback",
         [f"{o.plan.request_id}: {o.message[:300]}" for o in outcomes if "Traceback" in o.message])
    fail("broken response promises", [f"{o.plan.request_id}: {p}" for o in outcomes for p in o.problems])
    fail("completed requests with empty text",
         [o.plan.request_id for o in outcomes if o.kind == "ok" and not o.text and o.plan.max_tokens > 1])
    reference: dict[tuple[str, int, tuple[str, ...]], Outcome] = {}
    for o in outcomes:
        if o.kind == "ok":
            reference.setdefault(o.plan.key, o)
    fail("completions that differ from an earlier one of the same inputs", [
        f"{o.plan.request_id} (stream={o.plan.stream}) {o.text[:60]!r} != {ref.plan.request_id} {ref.text[:60]!r}"
        for o in outcomes if o.kind == "ok" and (ref := reference[o.plan.key]).text != o.text
    ])  # fmt: skip
    fail("cut-short streams that are not a prefix of the completion", [
        f"{o.plan.request_id} ({o.kind}) {o.text[:60]!r}"
        for o in outcomes
        if o.kind in ("stopped", "error") and o.plan.stream and o.plan.key in reference
        and not reference[o.plan.key].text.startswith(o.text)
    ])  # fmt: skip
    return failures


def log_tracebacks(log: str) -> list[str]:
    """Tracebacks in the server log other than the stub's known harmless race."""
    chunks = log.split("Traceback")[1:]
    return [c[:400] for c in chunks if not any(b in c[:2000] for b in BENIGN_LOG_TRACEBACKS)]


# --------------------------------------------------------------------------- the run


def run_soak(
    requests: int = 5000,
    concurrency: int = 64,
    time_limit_s: float = 600.0,
    cancel_rate: float = 0.1,
    fault_rate: float = 0.05,
    seed: int = 0,
    max_rss_growth_mib: float = 96.0,
    repository: Path | None = None,
    faults: Sequence[Fault] | None = None,
    url: str | None = None,
    metrics_url: str | None = None,
    server_pid: int | None = None,
    warmup: int | None = None,
    request_timeout_s: float = 60.0,
    leak_deadline_s: float = 30.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> SoakReport:
    """Start a server (unless `url`), run the warm-up, check it drained, measure memory, run
    the rest, check everything again; never raises for a failed check (see `failures`)."""
    with contextlib.ExitStack() as stack:
        server: TritonServer | None = None
        engines: Sequence[str] = CONTEXT_ENGINES + GENERATION_ENGINES
        if url is None:
            if repository is None:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-repo-")))
                chosen = faults if faults is not None else default_faults(fault_rate)
                repository = soak_repository(tmp / "models", [
                    Fault(f.engine, f.kind, fault_rate if f.rate < 0 else f.rate, f.phase) for f in chosen
                ])  # fmt: skip
            log(f"starting tritonserver on {repository}")
            server = stack.enter_context(TritonServer(model_repository=repository))
            assert server.process is not None
            url, server_pid = server.grpc_url, server.process.pid
            metrics_url = metrics_url or f"http://127.0.0.1:{server.metrics_port}/metrics"
            engines = [e for e in engines if (repository / e).is_dir()]
        return _soak(
            url, metrics_url, server_pid, server, engines, requests, concurrency, time_limit_s, cancel_rate, seed,
            max_rss_growth_mib, warmup, request_timeout_s, leak_deadline_s, log,
        )  # fmt: skip


def _soak(
    url: str, metrics_url: str | None, server_pid: int | None, server: TritonServer | None, engines: Sequence[str],
    requests: int, concurrency: int, time_limit_s: float, cancel_rate: float, seed: int, max_rss_growth_mib: float,
    warmup: int | None, request_timeout_s: float, leak_deadline_s: float, log: Callable[[str], None],
) -> SoakReport:  # fmt: skip
    plans = make_plans(requests, seed, cancel_rate)
    warm_n = min(len(plans), warmup if warmup is not None else max(200, len(plans) // 20))
    expected = expected_gauges(engines) if server is not None else set()
    failures: list[str] = []
    leak_wait: dict[str, float] = {}
    leaked: dict[str, float] = {}

    def check_drained(phase: str) -> None:
        if metrics_url is None:
            return
        waited, bad = wait_gauges_zero(metrics_url, expected, leak_deadline_s)
        leak_wait[phase] = round(waited, 2)
        if bad:
            leaked.update(bad)
            failures.append(f"leak after the {phase}: gauges not 0 within {leak_deadline_s:g}s: {bad}")

    def progress(done: int) -> None:
        if done % 500 == 0:
            log(f"  {done} requests done, {time.monotonic() - start:.0f}s")

    stops = StopChannel(url)
    start = time.monotonic()
    send_deadline = start + time_limit_s
    log(f"warm-up: {warm_n} requests, concurrency {concurrency}")
    outcomes, problems = run_load(url, plans[:warm_n], concurrency, stops, send_deadline, request_timeout_s, progress)
    check_drained("warmup")
    rss_warm = process_tree_rss_mib(server_pid) if server_pid else None
    log(f"soak: {len(plans) - warm_n} more requests" + (f" (server RSS now {rss_warm:.1f} MiB)" if rss_warm else ""))
    more, more_problems = run_load(url, plans[warm_n:], concurrency, stops, send_deadline, request_timeout_s,
                                   lambda done: progress(done + warm_n))  # fmt: skip
    outcomes += more
    problems += more_problems + stops.close(30.0)
    duration = time.monotonic() - start
    check_drained("end")
    rss_end = process_tree_rss_mib(server_pid) if server_pid else None

    failures[:0] = check_outcomes(outcomes)
    failures.extend(problems)
    if server_pid and server is not None and server.process is not None and server.process.poll() is not None:
        failures.append(f"tritonserver exited during the soak with {server.process.returncode}")
    growth = None if rss_warm is None or rss_end is None else rss_end - rss_warm
    if growth is not None and growth > max_rss_growth_mib:
        failures.append(f"server RSS grew {growth:.1f} MiB ({rss_warm:.1f} -> {rss_end:.1f}), bound {max_rss_growth_mib:g} MiB")
    tracebacks = None
    if server is not None:
        found = log_tracebacks(server.log_text())
        tracebacks = len(found)
        if found:
            failures.append(f"{len(found)} tracebacks in the server log ({server.log_path}); first: {found[0]!r}")
    kinds = Counter(o.kind if o.kind != "error" else f"error:{o.code}" for o in outcomes)
    samples: dict[str, str] = {}
    for o in outcomes:
        if o.kind == "error":
            samples.setdefault(o.code, o.message)
    latencies = [o.latency_s for o in outcomes if o.kind == "ok"]
    return SoakReport(
        requests_planned=len(plans),
        requests_sent=len(outcomes),
        concurrency=concurrency,
        duration_s=round(duration, 2),
        requests_per_s=round(len(outcomes) / duration, 2) if duration > 0 else 0.0,
        outcomes=dict(kinds),
        stops_sent=dict(Counter(o.stop_sent for o in outcomes if o.stop_sent)),
        error_samples=samples,
        latency_p50_s=round(percentile(latencies, 0.50), 4),
        latency_p99_s=round(percentile(latencies, 0.99), 4),
        rss_warm_mib=None if rss_warm is None else round(rss_warm, 1),
        rss_end_mib=None if rss_end is None else round(rss_end, 1),
        rss_growth_mib=None if growth is None else round(growth, 1),
        max_rss_growth_mib=max_rss_growth_mib,
        leak_wait_s=leak_wait,
        leaked=leaked,
        log_tracebacks=tracebacks,
        failures=failures,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; no new request is sent after it")
    parser.add_argument("--cancel-rate", type=float, default=0.1, help="share of requests that get a stop=true")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of each faulty engine's requests")
    parser.add_argument("--fault", type=parse_fault, action="append", metavar="ENGINE=KIND[@RATE]",
                        help="replace the default faults (repeatable; kinds: fail hang slow crash drop_lease)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=96.0)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request without a final by then hung")
    parser.add_argument("--warmup", type=int, help="warm-up requests before the memory baseline (default 5%%, >= 200)")
    parser.add_argument("--repository", type=Path, help="serve this repository instead of a derived faulty one")
    parser.add_argument("--url", help="gRPC host:port of a running server (loopback) instead of starting one")
    parser.add_argument("--metrics-url", help="with --url: its metrics endpoint, e.g. http://127.0.0.1:8002/metrics")
    parser.add_argument("--server-pid", type=int, help="with --url: tritonserver's pid, for the memory check")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run_soak(
        requests=args.requests, concurrency=args.concurrency, time_limit_s=args.time_limit,
        cancel_rate=args.cancel_rate, fault_rate=args.fault_rate, seed=args.seed,
        max_rss_growth_mib=args.max_rss_growth_mib, repository=args.repository.resolve() if args.repository else None,
        faults=args.fault, url=args.url, metrics_url=args.metrics_url, server_pid=args.server_pid,
        warmup=args.warmup, request_timeout_s=args.request_timeout,
    )  # fmt: skip
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
