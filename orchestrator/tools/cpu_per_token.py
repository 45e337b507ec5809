"""CPU time per generated token, per process: where a deployment's frontend spends its CPU.

Every generated token crosses tritonserver, the orchestrator's stub, the engines' stubs and
postprocessing; on a real deployment the frontend's cores, not the GPUs, can bound the
token rate. For each repository given, this starts a fresh server on it, warms it up, then
runs one closed-loop load through the ensemble (gRPC streaming, `orchestrator/tools/loadgen.py`) and
reads each process's user + system CPU time from `/proc/<pid>/stat` before and after:
tritonserver, every python stub (named by its model) and the load generator itself. The
token count is the server's `num_output_tokens` summed over the requests, not the number
of responses. Repositories are measured one after the other in one run, so their ratios
can be compared (BENCHMARKS.md).

    disagg cpu-per-token [--repository DIR ...] [--concurrency 64] [--isl 128] [--osl 64] \
        [--count 640] [--json out.json]

Loopback only; each load is bounded by `count` and `time_limit_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.tools.launch import DEFAULT_REPOSITORY, TritonServer
from orchestrator.tools.loadgen import run_load
from orchestrator.tools.stacks import process_tree

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of stat)


def server_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds per process of the server's tree, by name (stubs by model; same names summed)."""
    totals: dict[str, float] = {}
    for pid, name in process_tree(server_pid).items():
        try:
            totals[name] = totals.get(name, 0.0) + cpu_seconds(pid)
        except (OSError, IndexError):
            continue  # exited between the listing and the read
    return totals


@dataclass(frozen=True)
class Measurement:
    """One repository's load: tokens, and CPU microseconds per generated token per process."""

    repository: str
    concurrency: int
    requests_ok: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_s: float
    us_per_token: dict[str, float]  # process name -> CPU microseconds per generated token
    server_us_per_token: float  # tritonserver and every stub together (not the client)
    ttft_p50_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def measure(
    repository: Path, concurrency: int, isl: int, osl: int, count: int, warmup: int, time_limit_s: float, seed: int
) -> Measurement:
    workload = Workload(isl=LengthDist.parse(f"fixed:{isl}"), osl=LengthDist.parse(f"fixed:{osl}"), seed=seed)
    with TritonServer(model_repository=repository) as server:
        assert server.process is not None
        pid = server.process.pid
        run_load(
            server.grpc_url, workload, concurrency=concurrency, count=warmup, time_limit_s=time_limit_s, salt="warmup"
        )
        before, client_before = server_cpu(pid), cpu_seconds(os.getpid())
        results, summary = run_load(
            server.grpc_url, workload, concurrency=concurrency, count=count, time_limit_s=time_limit_s
        )
        after, client_after = server_cpu(pid), cpu_seconds(os.getpid())
    tokens = sum(r.output_tokens for r in results)
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    spent["client (load generator)"] = client_after - client_before
    per_token = {name: round(1e6 * s / max(tokens, 1), 1) for name, s in sorted(spent.items())}
    server_total = sum(s for name, s in spent.items() if not name.startswith("client"))
    return Measurement(
        str(repository), concurrency, summary.ok, summary.errors, tokens, round(summary.duration_s, 2),
        round(tokens / max(summary.duration_s, 1e-9), 1), per_token, round(1e6 * server_total / max(tokens, 1), 1),
        _ms(summary.ttft_p50_s), _ms(summary.itl_p50_s), _ms(summary.itl_p99_s),
    )  # fmt: skip


def _ms(seconds: float | None) -> float:
    return round(1e3 * seconds, 2) if seconds is not None else float("nan")


def format_table(measurements: Sequence[Measurement]) -> str:
    names = sorted({n for m in measurements for n in m.us_per_token})
    head = "process".ljust(26) + "".join(f"{Path(m.repository).parent.name[:14]:>16}" for m in measurements)
    lines = [head, "-" * len(head)]
    for name in names:
        lines.append(name[:26].ljust(26) + "".join(f"{m.us_per_token.get(name, 0.0):>16.1f}" for m in measurements))
    lines.append("server total".ljust(26) + "".join(f"{m.server_us_per_token:>16.1f}" for m in measurements))
    lines.append("tokens/s".ljust(26) + "".join(f"{m.tokens_per_s:>16.1f}" for m in measurements))
    lines.append("TTFT p50 ms".ljust(26) + "".join(f"{m.ttft_p50_ms:>16.2f}" for m in measurements))
    lines.append(
        "ITL p50 / p99 ms".ljust(26)
        + "".join(f"{f'{m.itl_p50_ms:.2f} / {m.itl_p99_ms:.2f}':>16}" for m in measurements)
    )
    lines.append("ok / errors".ljust(26) + "".join(f"{f'{m.requests_ok}/{m.errors}':>16}" for m in measurements))
    return "\n".join(lines) + "\n(CPU microseconds per generated token; columns: each repository's parent folder)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repository", type=Path, action="append", help="repeat to compare (default: the committed one)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--count", type=int, default=640, help="measured requests per repository")
    parser.add_argument("--warmup", type=int, default=64, help="requests before the CPU baseline")
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    repositories = [r.resolve() for r in (args.repository or [DEFAULT_REPOSITORY])]
    measurements = [
        measure(r, args.concurrency, args.isl, args.osl, args.count, args.warmup, args.time_limit, args.seed)
        for r in repositories
    ]
    print(format_table(measurements))
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in measurements], indent=2))
    return 0 if all(m.errors == 0 for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
