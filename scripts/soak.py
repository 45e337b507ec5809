"""Bounded soak: thousands of mixed requests, injected engine faults and stops, then proof
that nothing leaked.

    python scripts/soak.py --requests 5000 --concurrency 64 --time-limit 600 [--json report.json]

Why: the per-feature tests send a handful of requests, while leaks and lost final
responses show up only under churn: retries after faults, stops racing completions, KV
leases expiring. The soak drives that churn through the client-facing `ensemble` and
then checks what must hold after any load:

- every request got exactly one final response (its tokens or one error; a stopped one
  an empty final when streaming, the text so far when not), nothing after it, and none
  hung (per-request timeout); every stop request got one empty final response;
- errors are only the kinds faults and stops may cause (UNAVAILABLE, CANCELLED) and no
  message carries a Python traceback; on its own repository (`max_migrations: 1`) no
  request ends with a mid-stream failure that was not migrated ("not retried"): an
  injected crash after streamed tokens must end `ok`, its text equal to the others';
- completed outputs are deterministic: every completion of the same prompt and sampling
  inputs is the same text, streamed or not, and a cut-short stream is a prefix of it;
- afterwards every `disagg_*` gauge (requests, child requests, leases, KV blocks, pending
  stops) returns to 0, both after the warm-up and at the end;
- the server's resident memory (tritonserver plus its python backend stubs) grows by at
  most `--max-rss-growth-mib` between the end of the warm-up and the end of the run.

Without `--repository` and `--url` it derives a repository from `model_repository/` with
a different fault on every engine (see `default_faults`; `--fault` picks others, e.g.
`fail` or `slow`), short engine timeouts so injected hangs end, and 2 s KV lease expiry,
and starts its own tritonserver on free loopback ports. It also watches the server's
processes: a stub that dies ends the soak at once as a failure. With `--url` it drives a
running loopback server instead; the gauges are read from `--metrics` and memory from
`--server-pid`, each check skipped when not given.

The exit status is 0 only when every check passed; `run_soak()` is the same run
in-process (the CI soak in tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `scripts` and `orchestrator` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from orchestrator.gauges import HOLDING  # noqa: E402
from orchestrator.tokenizer import WORDS  # noqa: E402
from scripts.client import ensemble_inputs  # noqa: E402
from scripts.launch import DEFAULT_REPOSITORY, TritonServer  # noqa: E402
from scripts.metrics import gauges as metric_gauges  # noqa: E402
from scripts.metrics import samples as metric_samples  # noqa: E402
from scripts.repository import ModelSpec, derive, set_parameters  # noqa: E402
from scripts.stacks import dump_threads, process_tree  # noqa: E402

MODEL = "ensemble"
FRONTEND_MODELS = ("ensemble", "preprocessing", "orchestrator", "postprocessing")
CONTEXT_ENGINES = ("context_0", "context_1")
GENERATION_ENGINES = ("generation_0", "generation_1")
# What injected faults and stops may legitimately end a request with; anything else is a bug.
EXPECTED_ERROR_CODES = ("UNAVAILABLE", "CANCELLED")
# A mid-stream engine failure that ended the request instead of migrating it (max_migrations=0's wording).
NOT_MIGRATED = "(after tokens were streamed: not retried)"
MIGRATIONS_METRIC = "disagg_orchestrator_migrations_total"
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
    - generation_0 crashes after 2 generated tokens: a streamed request migrates (a context
      phase over prompt + tokens so far, then the other generation engine) and ends ok with
      the same text; a non-streamed one is retried; its blocks are freed mid-stream;
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
        "max_migrations": "1",
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


Key = tuple[str, int, tuple[str, ...]]  # prompt, max_tokens, stop words


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
    def key(self) -> Key:
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
            # Some race the request's own arrival, most land mid-request, the tail after
            # completion (which must be harmless).
            when = rng.random()
            delay = rng.uniform(0.0, 0.003) if when < 0.2 else rng.uniform(0.003, 0.5) if when < 0.8 else rng.uniform(0.5, 3.0)
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


def _text(result: grpcclient.InferResult) -> str:
    arr = result.as_numpy("text_output")
    return "" if arr is None else b"".join(arr.reshape(-1)).decode("utf-8", errors="replace")


def _is_final(result: grpcclient.InferResult) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


Reply = tuple[grpcclient.InferResult | None, InferenceServerException | None]


class Stream:
    """One gRPC stream (its own client) whose replies land in a queue, carrying one request
    at a time: a stream's errors have no request id, so one-at-a-time is what lets an error
    be attributed. A reply that arrives after its request's final is seen later as a stray."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))

    def send(self, request_id: str, inputs: list[grpcclient.InferInput]) -> None:
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)

    def get(self, timeout_s: float) -> Reply | None:
        try:
            return self.replies.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def strays(self) -> list[str]:
        """Whatever is already queued (called after a final: a reply after the final)."""
        found = []
        while (reply := self.get(0.0)) is not None:
            result, error = reply
            found.append(error.message() if error is not None else f"a response for {result.get_response().id!r}")
        return found

    def close(self, timeout_s: float, cancel: bool = False) -> bool:
        """Half-close and wait for the server to end the stream, which it does only once
        every request sent on it is complete; False if that did not happen in time."""
        done = threading.Event()

        def close() -> None:
            with contextlib.suppress(Exception):
                self.client.stop_stream(cancel_requests=cancel)
                self.client.close()
            done.set()

        threading.Thread(target=close, daemon=True, name="soak-close").start()
        return done.wait(timeout_s)


@dataclass
class _Shared:
    """What the worker threads share: the plans to take, the results, the bounds."""

    url: str
    plans: Iterator[Plan]
    send_deadline: float  # monotonic: no new request after this
    request_timeout_s: float
    stop_timeout_s: float
    abort: threading.Event  # a server process died, or too many requests hung: stop at once
    max_hung: int  # this many hung requests mean the server is broken: stop instead of waiting on each
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one request
    on_outcome: Callable[[int], None] | None = None

    def take(self) -> Plan | None:
        with self.lock:
            if time.monotonic() >= self.send_deadline or self.abort.is_set():
                return None
            return next(self.plans, None)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            done = len(self.outcomes)
            hung = outcome.kind == "hung" and sum(o.kind == "hung" for o in self.outcomes) == self.max_hung
        if hung and not self.abort.is_set():
            self.problem(f"stopped the load after {self.max_hung} hung requests: the server no longer answers")
            self.abort.set()
        if self.on_outcome is not None:
            self.on_outcome(done)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Worker:
    """Serves plans one at a time on its own request stream, and sends their stops on its
    own stop stream (a stop's reply has the stopped request's id, so it needs a stream of
    its own to be told apart from that request's final)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.requests = Stream(shared.url)
        self.stops: Stream | None = None

    def run(self) -> None:
        try:
            while (plan := self.shared.take()) is not None:
                self.shared.record(self.serve(plan))
        except Exception as exc:  # noqa: BLE001 - a client-side bug must fail the soak, not vanish in a thread
            self.shared.problem(f"worker crashed: {exc!r}")
        finally:
            self.finish()

    def serve(self, plan: Plan) -> Outcome:
        start = time.monotonic()
        deadline = start + self.shared.request_timeout_s
        stop_at = None if plan.stop_delay_s is None else start + plan.stop_delay_s
        stop_sent = ""
        extra = {"stop_words": list(plan.stop_words)} if plan.stop_words else {}
        inputs = ensemble_inputs(plan.prompt, plan.max_tokens, stream=plan.stream, exclude_input_in_output=True, **extra)
        self.requests.send(plan.request_id, inputs)
        kind, code, message, texts = "", "", "", []
        while not kind:
            if stop_at is not None and not stop_sent and time.monotonic() >= stop_at:
                self._send_stop(plan.request_id)
                stop_sent = "before_final"
            wake = deadline if stop_at is None or stop_sent else min(deadline, stop_at)
            reply = self.requests.get(min(wake - time.monotonic(), 0.5))
            if reply is None:
                if time.monotonic() >= deadline:
                    kind, message = "hung", f"no final response within {self.shared.request_timeout_s:g}s"
                elif self.shared.abort.is_set():
                    kind, message = "hung", "no final response before the soak stopped"
                continue
            result, error = reply
            if error is not None or result is None:
                kind, message = "error", error.message() if error is not None else "an empty reply"
                code = error_code(message)
                continue
            rid = result.get_response().id
            if rid != plan.request_id:
                self.shared.problem(f"a response for {rid!r} arrived after its final (during {plan.request_id})")
                continue
            texts.append(_text(result))
            if _is_final(result):
                kind = "ok"
        latency = time.monotonic() - start
        problems: list[str] = []
        if stop_at is not None and not stop_sent:
            self._send_stop(plan.request_id)  # its delay outlived the request: a stop after the final
            stop_sent = "after_final"
        if stop_sent:
            problems.extend(self._await_stop(plan.request_id))
        if kind == "hung":
            self._replace_requests()
        else:
            problems.extend(f"after its final: {s}" for s in self.requests.strays())
        return Outcome(plan, kind, code, message, "".join(texts), latency, stop_sent, tuple(problems))

    def _send_stop(self, request_id: str) -> None:
        if self.stops is None:
            self.stops = Stream(self.shared.url)
        self.stops.send(request_id, ensemble_inputs("", 1, stop=True))

    def _await_stop(self, request_id: str) -> list[str]:
        """A stop request must get exactly one response: an empty final with its id."""
        assert self.stops is not None
        timeout_s = 1.0 if self.shared.abort.is_set() else self.shared.stop_timeout_s
        reply = self.stops.get(timeout_s)
        if reply is None:
            self.stops.close(5.0, cancel=True)
            self.stops = None
            return [f"its stop request got no response within {timeout_s:g}s"]
        result, error = reply
        problems = []
        if error is not None or result is None:
            problems.append(f"its stop request failed: {error.message() if error else 'an empty reply'}")
        elif not _is_final(result) or _text(result) or result.get_response().id != request_id:
            problems.append(f"its stop request's response is not one empty final with its id "
                            f"(final={_is_final(result)}, text={_text(result)!r}, id={result.get_response().id!r})")
        problems.extend(f"after its stop's final: {s}" for s in self.stops.strays())
        return problems

    def _replace_requests(self) -> None:
        """After a hang the stream still owes a reply that could not be attributed: cancel it
        (ending the hung request in Triton) and carry on with a fresh stream."""
        self.requests.close(10.0, cancel=True)
        self.requests = Stream(self.shared.url)

    def finish(self) -> None:
        for stream in (self.requests, self.stops):
            if stream is None:
                continue
            if self.shared.abort.is_set():  # the server cannot finish what it holds: do not wait
                stream.close(5.0, cancel=True)
                continue
            if not stream.close(30.0):
                self.shared.problem("a stream did not end after its last final: the server still holds a request on it")
            for stray in stream.strays():
                self.shared.problem(f"after a stream's last final: {stray}")


def run_load(
    url: str,
    plans: Sequence[Plan],
    concurrency: int,
    send_deadline: float,
    request_timeout_s: float,
    stop_timeout_s: float = 10.0,
    on_outcome: Callable[[int], None] | None = None,
    abort: threading.Event | None = None,
    max_hung: int = 10,
) -> tuple[list[Outcome], list[str]]:
    """Run `plans` on `concurrency` workers until they run out, the send deadline passes,
    `max_hung` requests hung or `abort` is set (then requests still waiting end as hung)."""
    shared = _Shared(
        url, iter(plans), send_deadline, request_timeout_s, stop_timeout_s, abort or threading.Event(), max_hung,
        on_outcome=on_outcome,
    )  # fmt: skip
    threads = [
        threading.Thread(target=Worker(shared).run, name=f"soak-worker-{i}", daemon=True)
        for i in range(min(concurrency, len(plans)))
    ]
    for t in threads:
        t.start()
    # Every wait of a worker is bounded (request and stop timeouts, stream close), so is this.
    per_request = request_timeout_s + stop_timeout_s + 15.0
    join_by = max(time.monotonic(), send_deadline) + per_request + 60.0
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    problems = list(shared.problems)
    if any(t.is_alive() for t in threads):
        problems.append("a worker thread did not finish: a client wait was not bounded")
    return list(shared.outcomes), problems


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
    """The holding gauges a soak repository must publish, keyed as `scripts.metrics.gauges`
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
    fail("unexpected error kinds",
         [f"{o.plan.request_id}: {o.message}" for o in outcomes if o.kind == "error" and o.code not in EXPECTED_ERROR_CODES])
    fail("error messages with a traceback",
         [f"{o.plan.request_id}: {o.message[:300]}" for o in outcomes if "Traceback" in o.message])
    if migrating:
        fail("mid-stream failures that were not migrated",
             [f"{o.plan.request_id}: {o.message[:300]}" for o in outcomes if NOT_MIGRATED in o.message])
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


def _pools_over_grpc(repository: Path, grpc_port: int) -> None:
    """Point the orchestrator at its own server's engines through loopback gRPC."""
    config = repository / "orchestrator" / "config.pbtxt"
    pools = {
        "context_engines": ",".join(f"grpc://127.0.0.1:{grpc_port}/{e}" for e in CONTEXT_ENGINES if (repository / e).is_dir()),
        "generation_engines": ",".join(f"grpc://127.0.0.1:{grpc_port}/{e}" for e in GENERATION_ENGINES if (repository / e).is_dir()),
    }
    config.write_text(set_parameters(config.read_text(), pools))


def check_loopback(address: str) -> None:
    """The soak talks to loopback only: it is a load generator, not a probe of other hosts."""
    host = re.sub(r"^\w+://", "", address).rsplit(":", 1)[0].strip("[]").split("/")[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the soak only drives a server on loopback, got {address!r}")


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
    metrics: str | None = None,
    server_pid: int | None = None,
    warmup: int | None = None,
    request_timeout_s: float = 30.0,
    leak_deadline_s: float = 30.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    engines_over: str = "bls",
    dump_dir: Path | None = None,
    streams_over: str = "",
) -> SoakReport:
    """Start a server (unless `url`), run the warm-up, check it drained, measure memory, run
    the rest, check everything again; never raises for a failed check (see `failures`).

    `metrics` (HOST:PORT) and `server_pid` only matter with `url`: the checks that need
    them are skipped when they are not given. `engines_over="grpc"` has the orchestrator
    reach the engines of its own server as `grpc://127.0.0.1:<port>/...` instead of by BLS
    (no python-backend BLS response iterators at all); `streams_over` sets the orchestrator
    parameter of that name in the derived repository ("" keeps its default, grpc; "bls"
    sends streaming generations over BLS, where Triton's python backend can deadlock the
    orchestrator's stub: README "The BLS stub crash"). With `dump_dir`, a run whose
    requests hung saves every thread's native stack of the server and its stubs there."""
    if engines_over not in ("bls", "grpc"):
        raise ValueError(f"engines_over must be 'bls' or 'grpc', got {engines_over!r}")
    with contextlib.ExitStack() as stack:
        server: TritonServer | None = None
        engines: Sequence[str] = ()
        migrating = False  # the soak's own repository migrates mid-stream failures (max_migrations=1)
        if url is None:
            if repository is None:
                migrating = True
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-repo-")))
                chosen = faults if faults is not None else default_faults(fault_rate)
                repository = soak_repository(tmp / "models", [
                    Fault(f.engine, f.kind, fault_rate if f.rate < 0 else f.rate, f.phase) for f in chosen
                ])  # fmt: skip
            log(f"starting tritonserver on {repository}")
            server = TritonServer(model_repository=repository)  # its ports are chosen now
            if engines_over == "grpc":
                _pools_over_grpc(repository, server.grpc_port)
            if streams_over:
                config = repository / "orchestrator" / "config.pbtxt"
                config.write_text(set_parameters(config.read_text(), {"streams_over": streams_over}))
            server = stack.enter_context(server)
            assert server.process is not None
            url, server_pid, metrics = server.grpc_url, server.process.pid, f"127.0.0.1:{server.metrics_port}"
            engines = [e for e in CONTEXT_ENGINES + GENERATION_ENGINES if (repository / e).is_dir()]
        for address in filter(None, (url, metrics)):
            check_loopback(address)
        return _soak(
            url, metrics, server_pid, server, engines, requests, concurrency, time_limit_s, cancel_rate, seed,
            max_rss_growth_mib, warmup, request_timeout_s, leak_deadline_s, log, migrating, dump_dir,
        )  # fmt: skip


def _soak(
    url: str, metrics: str | None, server_pid: int | None, server: TritonServer | None, engines: Sequence[str],
    requests: int, concurrency: int, time_limit_s: float, cancel_rate: float, seed: int, max_rss_growth_mib: float,
    warmup: int | None, request_timeout_s: float, leak_deadline_s: float, log: Callable[[str], None],
    migrating: bool = False, dump_dir: Path | None = None,
) -> SoakReport:  # fmt: skip
    plans = make_plans(requests, seed, cancel_rate)
    warm_n = min(len(plans), warmup if warmup is not None else max(200, len(plans) // 20))
    expected = expected_gauges(engines) if engines else set()
    failures: list[str] = []
    leak_wait: dict[str, float] = {}
    leaked: dict[str, float] = {}
    abort = threading.Event()  # a server process died or requests hung: the server is broken, stop
    watch = ServerWatch(server_pid, abort)

    def check_drained(phase: str) -> None:
        if metrics is None or abort.is_set():  # a broken server holds what it holds: nothing to learn
            return
        waited, bad = wait_gauges_zero(metrics, expected, leak_deadline_s)
        leak_wait[phase] = round(waited, 2)
        if bad:
            leaked.update(bad)
            failures.append(f"leak after the {phase}: gauges not 0 within {leak_deadline_s:g}s: {bad}")

    def progress(done: int) -> None:
        if done % 500 == 0:
            log(f"  {done} requests done, {time.monotonic() - start:.0f}s")

    start = time.monotonic()
    send_deadline = start + time_limit_s
    log(f"warm-up: {warm_n} requests, concurrency {concurrency}")
    outcomes, problems = run_load(
        url, plans[:warm_n], concurrency, send_deadline, request_timeout_s, on_outcome=progress, abort=abort
    )
    check_drained("warmup")
    rss_warm_parts = process_rss_mib(server_pid) if server_pid and not abort.is_set() else {}
    rss_warm = sum(rss_warm_parts.values()) if rss_warm_parts else None
    log(f"soak: {len(plans) - warm_n} more requests" + (f" (server RSS now {rss_warm:.1f} MiB)" if rss_warm else ""))
    more, more_problems = run_load(
        url, plans[warm_n:], concurrency, send_deadline, request_timeout_s,
        on_outcome=lambda done: progress(done + warm_n), abort=abort,
    )  # fmt: skip
    outcomes += more
    problems += more_problems
    duration = time.monotonic() - start
    if dump_dir is not None and server_pid and any(o.kind == "hung" for o in outcomes):
        dump_threads(server_pid, dump_dir)
        log(f"stacks of the server's processes: {dump_dir}")
    check_drained("end")
    died = watch.close()
    rss_end_parts = process_rss_mib(server_pid) if server_pid and not abort.is_set() else {}
    rss_end = sum(rss_end_parts.values()) if rss_end_parts else None

    refs = references(outcomes)
    if died:
        failures.append(
            f"server processes died during the soak: {sorted(died.values())}; a dead stub fails or strands every "
            f"request of its model, so the soak stopped after {len(outcomes)} requests"
        )  # fmt: skip
    failures.extend(check_outcomes(outcomes, refs, migrating))
    migrations = migration_counts(metrics) if metrics is not None and not abort.is_set() else None
    failures.extend(problems)
    growth = None if rss_warm is None or rss_end is None else rss_end - rss_warm
    if growth is not None and growth > max_rss_growth_mib:
        failures.append(f"server RSS grew {growth:.1f} MiB ({rss_warm:.1f} -> {rss_end:.1f}), bound {max_rss_growth_mib:g} MiB")
    if server is not None:
        found = log_tracebacks(server.log_text())
        if found:
            failures.append(f"{len(found)} tracebacks in the server log; first: {found[0]!r}")
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
    parser.add_argument("--request-timeout", type=float, default=30.0, help="a request without a final by then hung")
    parser.add_argument("--warmup", type=int, help="warm-up requests before the memory baseline (default 5%%, >= 200)")
    parser.add_argument("--repository", type=Path, help="serve this repository instead of a derived faulty one")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server (loopback) instead of starting one")
    parser.add_argument("--metrics", help="with --url: HOST:PORT of its metrics endpoint, for the leak check")
    parser.add_argument("--server-pid", type=int, help="with --url: tritonserver's pid, for the memory check")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--streams-over", choices=("grpc", "bls"), default="",
                        help="the orchestrator's streams_over (default: its own, grpc); bls reproduces the BLS deadlock")
    parser.add_argument("--dump-dir", type=Path, help="when requests hang: gdb stacks of the server and its stubs here")
    parser.add_argument("--engines-over", choices=("bls", "grpc"), default="bls",
                        help="how the orchestrator reaches the engines (grpc: loopback, avoids the BLS stub crash)")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, `timeout`) must unwind like Ctrl-C so the server we started stops.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        report = run_soak(
            requests=args.requests, concurrency=args.concurrency, time_limit_s=args.time_limit,
            cancel_rate=args.cancel_rate, fault_rate=args.fault_rate, seed=args.seed,
            max_rss_growth_mib=args.max_rss_growth_mib,
            repository=args.repository.resolve() if args.repository else None, faults=args.fault,
            url=args.url, metrics=args.metrics, server_pid=args.server_pid,
            warmup=args.warmup, request_timeout_s=args.request_timeout, engines_over=args.engines_over,
            dump_dir=args.dump_dir, streams_over=args.streams_over,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
