"""Bounded soak: thousands of mixed requests, injected engine faults and stops, then proof
that nothing leaked.

    disagg soak --requests 5000 --concurrency 64 --time-limit 600 [--json report.json]

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

On a terminal, stderr shows a bar of the requests finished (`--progress` / `--no-progress`
to choose; without one, a line every 500 requests). The exit status is 0 only when every
check passed; `run_soak()` is the same run in-process (the CI soak in tests/e2e/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from orchestrator.tools.launch import TritonServer
from orchestrator.tools.progress import add_progress_flag, echo, progress
from orchestrator.tools.repository import set_parameters
from orchestrator.tools.soak_checks import (
    Outcome,
    ServerWatch,
    SoakReport,
    expected_gauges,
    migration_counts,
    process_rss_mib,
    references,
    wait_gauges_zero,
)
from orchestrator.tools.soak_client import run_load
from orchestrator.tools.soak_plan import (
    CONTEXT_ENGINES,
    GENERATION_ENGINES,
    Fault,
    Plan,
    default_faults,
    make_plans,
    parse_fault,
    soak_repository,
)
from orchestrator.tools.soak_verdict import build_report, judge
from orchestrator.tools.stacks import dump_threads


def _pools_over_grpc(repository: Path, grpc_port: int) -> None:
    """Point the orchestrator at its own server's engines through loopback gRPC."""
    config = repository / "orchestrator" / "config.pbtxt"
    pools = {
        "context_engines": ",".join(
            f"grpc://127.0.0.1:{grpc_port}/{e}" for e in CONTEXT_ENGINES if (repository / e).is_dir()
        ),
        "generation_engines": ",".join(
            f"grpc://127.0.0.1:{grpc_port}/{e}" for e in GENERATION_ENGINES if (repository / e).is_dir()
        ),
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
    log: Callable[[str], None] = lambda line: echo(line, sys.stderr),
    engines_over: str = "bls",
    dump_dir: Path | None = None,
    streams_over: str = "",
    show_progress: bool | None = False,
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
    requests hung saves every thread's native stack of the server and its stubs there.
    `show_progress`: a bar of the requests finished on stderr (None: only when stderr is a
    terminal), in place of the `log` line every 500 requests."""
    if engines_over not in ("bls", "grpc"):
        raise ValueError(f"engines_over must be 'bls' or 'grpc', got {engines_over!r}")
    with contextlib.ExitStack() as stack:
        server: TritonServer | None = None
        engines: Sequence[str] = ()
        migrating = False  # the soak's own repository migrates mid-stream failures (max_migrations=1)
        if url is None:
            if repository is None:
                migrating = True
                repository = _derive_repository(stack, faults, fault_rate)
            server = _start_server(stack, repository, engines_over, streams_over, log)
            assert server.process is not None
            url, server_pid, metrics = server.grpc_url, server.process.pid, f"127.0.0.1:{server.metrics_port}"
            engines = [e for e in CONTEXT_ENGINES + GENERATION_ENGINES if (repository / e).is_dir()]
        for address in filter(None, (url, metrics)):
            check_loopback(address)
        return _soak(
            url, metrics, server_pid, server, engines, requests, concurrency, time_limit_s, cancel_rate, seed,
            max_rss_growth_mib, warmup, request_timeout_s, leak_deadline_s, log, migrating, dump_dir, show_progress,
        )  # fmt: skip


def _derive_repository(stack: contextlib.ExitStack, faults: Sequence[Fault] | None, fault_rate: float) -> Path:
    """A temporary faulty repository (`default_faults` unless `faults`; a fault's rate < 0
    means `fault_rate`), removed when `stack` closes."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-repo-")))
    chosen = faults if faults is not None else default_faults(fault_rate)
    return soak_repository(tmp / "models", [
        Fault(f.engine, f.kind, fault_rate if f.rate < 0 else f.rate, f.phase) for f in chosen
    ])  # fmt: skip


def _start_server(
    stack: contextlib.ExitStack, repository: Path, engines_over: str, streams_over: str, log: Callable[[str], None]
) -> TritonServer:
    """Start tritonserver on `repository`, stopped when `stack` closes. The orchestrator's
    parameters are set between choosing the ports and starting, as `engines_over="grpc"`
    needs the server's own gRPC port."""
    log(f"starting tritonserver on {repository}")
    server = TritonServer(model_repository=repository)  # its ports are chosen now
    if engines_over == "grpc":
        _pools_over_grpc(repository, server.grpc_port)
    if streams_over:
        config = repository / "orchestrator" / "config.pbtxt"
        config.write_text(set_parameters(config.read_text(), {"streams_over": streams_over}))
    return stack.enter_context(server)


def _soak(
    url: str, metrics: str | None, server_pid: int | None, server: TritonServer | None, engines: Sequence[str],
    requests: int, concurrency: int, time_limit_s: float, cancel_rate: float, seed: int, max_rss_growth_mib: float,
    warmup: int | None, request_timeout_s: float, leak_deadline_s: float, log: Callable[[str], None],
    migrating: bool = False, dump_dir: Path | None = None, show_progress: bool | None = False,
) -> SoakReport:  # fmt: skip
    """The soak against a server already reached at `url`: run it, check for leaks after each
    phase, then judge and report (`run_soak` owns the server's lifetime)."""
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

    outcomes, problems, rss_warm_parts, duration = _run_phases(
        url, plans, warm_n, concurrency, time_limit_s, request_timeout_s, server_pid, abort, check_drained, log,
        show_progress,
    )  # fmt: skip
    if dump_dir is not None and server_pid and any(o.kind == "hung" for o in outcomes):
        dump_threads(server_pid, dump_dir)
        log(f"stacks of the server's processes: {dump_dir}")
    check_drained("end")
    died = watch.close()
    rss_end_parts = process_rss_mib(server_pid) if server_pid and not abort.is_set() else {}

    refs = references(outcomes)
    migrations = migration_counts(metrics) if metrics is not None and not abort.is_set() else None
    failures.extend(
        judge(outcomes, refs, problems, died, migrating, rss_warm_parts, rss_end_parts, max_rss_growth_mib, server)
    )
    return build_report(
        len(plans), concurrency, duration, outcomes, refs, rss_warm_parts, rss_end_parts, max_rss_growth_mib,
        leak_wait, leaked, migrations, server, failures,
    )  # fmt: skip


def _run_phases(
    url: str, plans: Sequence[Plan], warm_n: int, concurrency: int, time_limit_s: float, request_timeout_s: float,
    server_pid: int | None, abort: threading.Event, check_drained: Callable[[str], None],
    log: Callable[[str], None], show_progress: bool | None,
) -> tuple[list[Outcome], list[str], dict[str, float], float]:  # fmt: skip
    """The warm-up, its leak check and the memory baseline (so start-up allocations are not
    counted as growth), then the rest of `plans`. Returns the outcomes, the client's
    problems, the server's RSS per process after the warm-up, and the duration."""
    # Finished requests, warm-up and soak together: a bar on a terminal, else a log line per 500.
    bar = progress(len(plans), "soak", enabled=show_progress)

    def finished(done: int) -> None:  # from the worker threads
        bar.update()
        if done % 500 == 0 and not bar.shown:
            log(f"  {done} requests done, {time.monotonic() - start:.0f}s")

    start = time.monotonic()
    send_deadline = start + time_limit_s
    with bar:
        bar.note("warm-up")
        log(f"warm-up: {warm_n} requests, concurrency {concurrency}")
        outcomes, problems = run_load(
            url, plans[:warm_n], concurrency, send_deadline, request_timeout_s, on_outcome=finished, abort=abort
        )
        bar.note("leak check")
        check_drained("warmup")
        rss_warm_parts = process_rss_mib(server_pid) if server_pid and not abort.is_set() else {}
        rss_warm = sum(rss_warm_parts.values()) if rss_warm_parts else None
        log(
            f"soak: {len(plans) - warm_n} more requests" + (f" (server RSS now {rss_warm:.1f} MiB)" if rss_warm else "")
        )
        bar.note("soak")
        more, more_problems = run_load(
            url, plans[warm_n:], concurrency, send_deadline, request_timeout_s,
            on_outcome=lambda done: finished(done + warm_n), abort=abort,
        )  # fmt: skip
    outcomes += more
    problems += more_problems
    return outcomes, problems, rss_warm_parts, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; no new request is sent after it")
    parser.add_argument("--cancel-rate", type=float, default=0.1, help="share of requests that get a stop=true")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of each faulty engine's requests")
    parser.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        metavar="ENGINE=KIND[@RATE]",
        help="replace the default faults (repeatable; kinds: fail hang slow crash drop_lease)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=96.0)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="a request without a final by then hung")
    parser.add_argument("--warmup", type=int, help="warm-up requests before the memory baseline (default 5%%, >= 200)")
    parser.add_argument("--repository", type=Path, help="serve this repository instead of a derived faulty one")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server (loopback) instead of starting one")
    parser.add_argument("--metrics", help="with --url: HOST:PORT of its metrics endpoint, for the leak check")
    parser.add_argument("--server-pid", type=int, help="with --url: tritonserver's pid, for the memory check")
    parser.add_argument("--json", type=Path, help="also write the report here")
    add_progress_flag(parser)
    parser.add_argument(
        "--streams-over",
        choices=("grpc", "bls"),
        default="",
        help="the orchestrator's streams_over (default: its own, grpc); bls reproduces the BLS deadlock",
    )
    parser.add_argument("--dump-dir", type=Path, help="when requests hang: gdb stacks of the server and its stubs here")
    parser.add_argument(
        "--engines-over",
        choices=("bls", "grpc"),
        default="bls",
        help="how the orchestrator reaches the engines (grpc: loopback, avoids the BLS stub crash)",
    )
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
            dump_dir=args.dump_dir, streams_over=args.streams_over, show_progress=args.progress,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
