#!/usr/bin/env python3
"""Benchmark load generator: sweep the ensemble at fixed concurrencies or request rates.

    orchestrator/tools/loadgen.py --url 127.0.0.1:8001 (--concurrency 1,16,64 | --rate 2,4,8) --isl fixed:128 \
        --osl fixed:64 [--count 200] [--time-limit 60] [--engines 4] [--json out.json] [--csv out.csv] \
        [--goodput ttft_ms:2000 tpot_ms:25]

Load modes (one load level at a time; `sweep` runs them in order):

- closed loop, `concurrency=N`: N workers, each sends its next request when its previous
  one ended, so at most N are in flight (the classic "users" model);
- open loop, `rate=R`: requests arrive as a Poisson process of R requests/s (exponential
  gaps from a seeded RNG) whatever the server does, so queueing shows up in TTFT. Workers
  are added as arrivals need them, up to `max_in_flight` (a safety cap: at the cap the
  next arrival waits for a free slot and the schedule catches up after).

Both stop sending at `count` requests or `time_limit_s`, whichever comes first, then wait
up to `drain_timeout_s` for the requests in flight; those still open are stopped
(`stop=true`) and reported as errors. Throughput is over first send -> last completion.
With `--goodput KEY:VALUE ...` (keys ttft_ms, tpot_ms, itl_ms, e2e_ms; bounds in ms) each
level also reports its goodput: the requests/s that met every bound, over the same time
(orchestrator/bench/goodput.py defines the terms).
While a level runs, a progress bar of its finished requests is drawn on stderr when stderr
is a terminal (`--progress` / `--no-progress` to choose); the report on stdout is the same.

Each worker owns one connection carrying one request at a time: a gRPC stream
(`start_stream`; its errors carry no request id, so one request per stream is what lets an
error be attributed) or an HTTP session on `generate_stream` (server-sent events).

Requests: the prompt has exactly `isl` tokens for the built-in tokenizer (each word of
`WORDS` with a leading space is one token, and such words never merge); with
`shared_prefix_tokens` every prompt starts with the same words. Each load level draws
prompts of its own (a repeated prompt would hit the prefix cache), deterministic for the
seed; a second run with the same seed against the same server repeats them. Sent with
`max_tokens=osl`, `end_id=-1` (no end token: exactly osl tokens come back),
`exclude_input_in_output` and `return_num_output_tokens`. The server's
`num_output_tokens` is cumulative (tokens generated so far), so a response carries the
difference from the previous one. The generator talks to loopback only unless
`allow_remote`: it is a load generator, not a probe of other hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from orchestrator.bench.goodput import Slo
from orchestrator.bench.stats import RequestResult, Summary, load_key, summarize, write_csv, write_json
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.tools.load_connections import PROTOCOLS, Connection, connect
from orchestrator.tools.load_loops import LevelBar, LevelRun, closed_loop, open_loop
from orchestrator.tools.progress import add_progress_flag

REPO_ROOT = Path(__file__).resolve().parents[2]
_LOOPBACK_NAMES = ("localhost",)


# --------------------------------------------------------------------------- addresses


def host_of(url: str) -> str:
    """The host of `host:port`, `[::1]:port` or `scheme://host:port`."""
    parts = urlsplit(url if "://" in url else "//" + url)
    if not parts.hostname:
        raise ValueError(f"cannot find a host in url {url!r}: use host:port")
    return parts.hostname


def check_loopback(url: str, allow_remote: bool = False) -> None:
    """Refuse a non-loopback server unless asked: a load generator must not hit hosts by accident."""
    if allow_remote:
        return
    host = host_of(url)
    if host in _LOOPBACK_NAMES:
        return
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return
    raise ValueError(f"{url!r} is not on loopback (127.0.0.1, localhost, ::1); pass allow_remote / --allow-remote")


# --------------------------------------------------------------------------- one load level


def _check_level(
    concurrency: int | None, rate: float | None, count: int, max_in_flight: int, engines: int, protocol: str
) -> None:
    """Refuse a bad level before any connection opens (the command reports it as a usage error)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if engines < 1:
        raise ValueError(f"engines must be >= 1 (every engine of the deployment), got {engines}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is unknown: use one of {list(PROTOCOLS)}")


def _summarize_level(
    run: LevelRun, engines: int, mode: str, load: float, slo: Slo | None = None
) -> tuple[list[RequestResult], Summary]:
    """The level's results in sending order and their summary. Throughput is over first send ->
    last completion, so idle time before and after the requests does not dilute it."""
    results = run.ordered()
    if results:
        first = min(r.start_s for r in results)
        duration = max(r.start_s + r.e2e_s for r in results) - first
    else:
        duration = time.monotonic() - run.started
    return results, summarize(results, max(duration, 1e-9), engines, mode, load, slo)


def run_load(
    url: str,
    workload: Workload,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    count: int,
    time_limit_s: float | None,
    stream: bool = True,
    protocol: str = "grpc",
    model: str = "ensemble",
    engines: int = 1,
    progress: bool | None = False,
    max_in_flight: int = 1024,
    drain_timeout_s: float = 60.0,
    request_timeout_s: float = 300.0,
    allow_remote: bool = False,
    salt: str | None = None,
    connector: Callable[[threading.Event, float], Connection] | None = None,
    slo: Slo | None = None,
) -> tuple[list[RequestResult], Summary]:
    """One load level: closed loop at `concurrency` or open loop at `rate` requests/s.

    The prompts are the workload's for `salt`, by default one per mode and load, so every
    level of a sweep sends prompts of its own (see `Workload.requests`). `connector(abort,
    request_timeout_s)` makes each worker's connection instead of `protocol`'s (other
    contracts, e.g. token-level models in orchestrator/tools/overhead.py). `progress`: a bar
    of the level's finished requests on stderr; None: only when stderr is a terminal. `slo`:
    the summary's goodput counts the requests within its bounds (None: no goodput).
    """
    _check_level(concurrency, rate, count, max_in_flight, engines, protocol)
    check_loopback(url, allow_remote)
    mode, load = ("concurrency", concurrency) if concurrency is not None else ("rate", rate)
    assert load is not None
    run = LevelRun(workload, f"{mode}:{load_key(load)}" if salt is None else salt, count, time_limit_s)
    bar = LevelBar(progress, f"{mode} {load:g}", count)

    def make_conn() -> Connection:
        if connector is not None:
            return connector(run.abort, request_timeout_s)
        return connect(protocol, url, model, run.abort, request_timeout_s)

    try:
        if concurrency is not None:
            closed_loop(run, min(concurrency, count), make_conn, stream, drain_timeout_s, bar)
        else:
            open_loop(run, float(load), workload.seed, max_in_flight, make_conn, stream, drain_timeout_s, bar)
    finally:
        bar.end(run)
    return _summarize_level(run, engines, mode, load, slo)


def sweep(
    url: str, workload: Workload, loads: Sequence[float], mode: str,
    on_level: Callable[[Summary], None] | None = None, **options: Any,
) -> tuple[list[Summary], dict[float, list[RequestResult]]]:  # fmt: skip
    """`run_load` at each load in order (`mode`: "concurrency" or "rate"); options as there.
    `on_level(summary)` is called as each level ends (e.g. to advance a bar of levels)."""
    if mode not in ("concurrency", "rate"):
        raise ValueError(f"mode {mode!r} is unknown: use 'concurrency' or 'rate'")
    if len(set(loads)) != len(loads):
        raise ValueError(f"loads must be distinct, got {list(loads)}")
    summaries: list[Summary] = []
    results: dict[float, list[RequestResult]] = {}
    for load in loads:
        kwargs: dict[str, Any] = {mode: load, **options}
        rs, summary = run_load(url, workload, **kwargs)
        summaries.append(summary)
        results[load] = rs
        if on_level is not None:
            on_level(summary)
    return summaries, results


# --------------------------------------------------------------------------- reporting


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_COLUMNS = (
    "load", "req/s", "out tok/s", "tok/s/user", "tok/s/engine", "TTFT p50", "TTFT p99",
    "ITL p50", "ITL p99", "E2E p50", "E2E p99", "errors",
)  # fmt: skip
GOODPUT_COLUMNS = ("goodput req/s", "goodput/engine")  # after req/s, only when an SLO was given


def _goodput_cells(s: Summary) -> list[str]:
    per_engine = None if s.goodput_requests_per_s is None else s.goodput_requests_per_s / s.engines
    return [_num(s.goodput_requests_per_s, 2), _num(per_engine, 2)]


def format_table(summaries: Sequence[Summary]) -> str:
    """One row per load level; latencies in ms. Summaries with a goodput add its columns
    (requests/s meeting the SLO, and that over every engine) and the SLO to the title."""
    slo = next((s.slo for s in summaries if s.goodput_requests_per_s is not None), None)
    header = list(TABLE_COLUMNS)
    if slo is not None:
        header[2:2] = GOODPUT_COLUMNS
    rows = [header]
    for s in summaries:
        rows.append([
            f"{s.load:g}", _num(s.requests_per_s, 2), _num(s.output_tokens_per_s), _num(s.tokens_per_s_per_user),
            _num(s.output_tokens_per_s_per_engine), _ms(s.ttft_p50_s), _ms(s.ttft_p99_s), _ms(s.itl_p50_s),
            _ms(s.itl_p99_s), _ms(s.e2e_p50_s), _ms(s.e2e_p99_s), f"{s.errors}/{s.count}",
        ])  # fmt: skip
        if slo is not None:
            rows[-1][2:2] = _goodput_cells(s)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    mode = summaries[0].mode if summaries else "load"
    goodput = "" if slo is None else f"; goodput: {slo}"
    return f"({mode}; latencies in ms{goodput})\n" + "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_meta(argv: Sequence[str], script: str = "orchestrator/tools/loadgen.py", **extra: Any) -> dict[str, Any]:
    """What a reader of the JSON needs to reproduce the run."""
    return {
        "command": shlex.join([script, *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "git_commit": _git_commit(),
        **extra,
    }


def _loads(text: str, kind: type) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


class _GoodputAction(argparse.Action):
    """Reads every KEY:VALUE item of --goodput into one `Slo`; a bad item is a usage error naming it."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        try:
            setattr(namespace, self.dest, Slo.parse(list(values)))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


def add_goodput_flag(parser: argparse.ArgumentParser) -> None:
    """--goodput KEY:VALUE [KEY:VALUE ...] -> `args.goodput`, an `Slo` (None when not given)."""
    parser.add_argument(
        "--goodput", nargs="+", action=_GoodputAction, metavar="KEY:VALUE", default=None,
        help="also report goodput, the requests/s meeting every bound (ms): ttft_ms, tpot_ms, itl_ms, e2e_ms; "
        "e.g. --goodput ttft_ms:2000 tpot_ms:25",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    """The command line; kept apart from `main` so the flags can be checked without a server."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="server host:port (the HTTP port with --protocol http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--model", default="ensemble")
    loads = parser.add_mutually_exclusive_group(required=True)
    loads.add_argument("--concurrency", type=lambda t: _loads(t, int), help="closed loop: e.g. 1,16,64")
    loads.add_argument("--rate", type=lambda t: _loads(t, float), help="open loop, requests/s: e.g. 2,4,8")
    parser.add_argument("--isl", type=LengthDist.parse, default=LengthDist.parse("fixed:128"),
                        help="prompt tokens: fixed:N, uniform:LOW:HIGH, normal:MEAN:STD")  # fmt: skip
    parser.add_argument("--osl", type=LengthDist.parse, default=LengthDist.parse("fixed:128"), help="output tokens")
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200, help="requests per load level (at most)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds of sending per load level (0: none)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for requests in flight")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--max-in-flight", type=int, default=1024, help="open loop safety cap")
    parser.add_argument("--engines", type=int, default=1,
                        help="engines in the deployment, for tok/s/engine (committed repository: 4)")  # fmt: skip
    parser.add_argument("--no-stream", action="store_true", help="one response per request (TTFT = E2E)")
    parser.add_argument("--json", type=Path, help="write summaries, per-request timings and run metadata")
    parser.add_argument("--csv", type=Path, help="write one row per load level")
    add_progress_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar (as --no-progress)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a server that is not on loopback")
    add_goodput_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = "concurrency" if args.concurrency else "rate"
    bars = False if args.quiet else args.progress  # None: only when stderr is a terminal
    load_list = args.concurrency or args.rate
    try:
        check_loopback(args.url, args.allow_remote)
        workload = Workload(args.isl, args.osl, args.shared_prefix, args.seed)
        summaries, results = sweep(
            args.url, workload, load_list, mode,
            count=args.count, time_limit_s=args.time_limit or None, stream=not args.no_stream,
            protocol=args.protocol, model=args.model, engines=args.engines, progress=bars,
            max_in_flight=args.max_in_flight, drain_timeout_s=args.drain_timeout,
            request_timeout_s=args.request_timeout, allow_remote=args.allow_remote, slo=args.goodput,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summaries))
    for summary, rs in zip(summaries, results.values()):
        errors = sorted({r.error for r in rs if not r.ok})
        if errors:
            print(f"{mode} {summary.load:g}: {summary.errors} errors, e.g. {errors[0]}", file=sys.stderr)
    meta = run_meta(
        list(sys.argv[1:] if argv is None else argv),
        url=args.url, protocol=args.protocol, model=args.model, mode=mode,
        workload=workload.describe(), stream=not args.no_stream,
    )  # fmt: skip
    if args.json:
        write_json(args.json, summaries, results, meta)
    if args.csv:
        write_csv(args.csv, summaries)
    return 0 if all(s.errors == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
