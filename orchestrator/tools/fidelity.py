"""`disagg fidelity`: the simulator against the same deployment served on stub engines.

    disagg fidelity deployments/default.yaml deployments/aggregated.yaml \\
        --isl 1024 --osl 128 --concurrency 1,2,4 --count 24 --out benchmarks/results/fidelity

For each deployment file and concurrency: serve it (tritonserver, every engine a stub
process, streaming over gRPC as `disagg bench` does) and measure TTFT p50 and TPOT p50;
then simulate the same file with the same workload, concurrency and request count
(`orchestrator.sim`). The table gives both and the simulator's error. Meaningful where this
machine is not the bottleneck (a few requests in flight): above that, the served run also
measures the 2 CPU cores the whole deployment shares, which the simulation leaves out.
Writes OUT/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from orchestrator.bench.goodput import tpot_s
from orchestrator.bench.stats import RequestResult, percentile
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.ops.deployment import Deployment, load
from orchestrator.sim.driver import simulate
from orchestrator.sim.requests import from_workload
from orchestrator.tools.compare import engine_count
from orchestrator.tools.deploy import on_free_ports, serve
from orchestrator.tools.loadgen import run_meta, sweep


def p50(results: Sequence[RequestResult]) -> tuple[float | None, float | None]:
    """(TTFT p50, TPOT p50) of the ok requests, seconds."""
    ttfts = [r.ttft_s for r in results if r.ok and r.ttft_s is not None]
    tpots = [t for t in (tpot_s(r) for r in results if r.ok) if t is not None]
    return (percentile(ttfts, 50) if ttfts else None, percentile(tpots, 50) if tpots else None)


def served(d: Deployment, workload: Workload, loads: Sequence[int], count: int) -> dict[int, list[RequestResult]]:
    with tempfile.TemporaryDirectory(prefix=f"fidelity-{d.name}-") as tmp, ExitStack() as stack:
        free = on_free_ports(d)
        frontend = serve(free, Path(tmp), stack)[free.frontend]
        _, results = sweep(frontend.grpc_url, workload, loads, "concurrency", count=count, time_limit_s=0,
                           engines=engine_count(d), progress=False, request_timeout_s=300.0)  # fmt: skip
    return {int(k): v for k, v in results.items()}


def error(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else (sim - real) / real


def compare(d: Deployment, workload: Workload, loads: Sequence[int], count: int) -> list[dict[str, Any]]:
    """One row per concurrency: served and simulated TTFT/TPOT p50 and the relative errors."""
    real = served(d, workload, loads, count)
    rows = []
    for c in loads:
        run = simulate(d, from_workload(workload, count, salt=f"c{c}"), concurrency=c)
        (rt, rp), (st, sp) = p50(real[c]), p50(run.results)
        rows.append({
            "deployment": d.name, "concurrency": c, "requests": count,
            "errors_served": sum(not r.ok for r in real[c]), "errors_simulated": run.summary.errors,
            "ttft_p50_served_s": rt, "ttft_p50_simulated_s": st, "ttft_error": error(st, rt),
            "tpot_p50_served_s": rp, "tpot_p50_simulated_s": sp, "tpot_error": error(sp, rp),
        })  # fmt: skip
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| deployment | in flight | TTFT p50 served ms | simulated | error | TPOT p50 served ms | simulated | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['deployment']} | {r['concurrency']} | {_ms(r['ttft_p50_served_s'])} | {_ms(r['ttft_p50_simulated_s'])} "
            f"| {_pct(r['ttft_error'])} | {_ms(r['tpot_p50_served_s'])} | {_ms(r['tpot_p50_simulated_s'])} "
            f"| {_pct(r['tpot_error'])} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("deployments", type=Path, nargs="+", help="deployment files (stub pools)")
    parser.add_argument("--isl", type=LengthDist.parse, default=LengthDist.parse("fixed:1024"))
    parser.add_argument("--osl", type=LengthDist.parse, default=LengthDist.parse("fixed:128"))
    parser.add_argument("--concurrency", default="1,2,4", help="closed-loop levels, e.g. 1,2,4")
    parser.add_argument("--count", type=int, default=24, help="requests per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="directory for fidelity.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loads = [int(x) for x in args.concurrency.split(",") if x.strip()]
    workload = Workload(args.isl, args.osl, 0, args.seed)
    rows: list[dict[str, Any]] = []
    for path in args.deployments:
        rows.extend(compare(load(path), workload, loads, args.count))
        print(format_rows(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": run_meta(list(argv or []), script="orchestrator/tools/fidelity.py"),
           "workload": workload.describe(), "rows": rows}  # fmt: skip
    (args.out / "fidelity.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0
