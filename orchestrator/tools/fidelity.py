"""`disagg fidelity`: the simulator against the same deployment served on stub engines.

    disagg fidelity deployments/default.yaml deployments/aggregated.yaml \\
        --isl 1024 --osl 128 --concurrency 1,2,4 --count 24 --out benchmarks/results/fidelity

For each deployment file and concurrency: serve it (tritonserver, every engine a stub
process, streaming over gRPC as `disagg bench` does) and measure TTFT p50 and TPOT p50;
then simulate the same file with the same workload, concurrency and request count
(`orchestrator.sim`). The table gives both and the simulator's error. Meaningful where this
machine is not the bottleneck (a few requests in flight): above that, the served run also
measures the 2 CPU cores the whole deployment shares, which the simulation leaves out.
With --goodput, each row also compares goodput, counted for both as `disagg plan` counts
it: the steady-state rate (`orchestrator.sim.steady`) times the share of
steady-state requests meeting every bound. With --slow-down N, both run the files with every
modelled duration x N (GPUs N times slower): a deployment planned at GPU scale can then
be served at its planned load in users on this machine; rates come out / N, so give the
SLOs x N. Writes OUT/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from orchestrator.bench.goodput import Slo, tpot_s
from orchestrator.bench.stats import RequestResult, percentile
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.ops.deployment import Deployment, load
from orchestrator.sim.driver import simulate
from orchestrator.sim.requests import from_workload
from orchestrator.sim.shapes import slowed
from orchestrator.sim.steady import steady_goodput
from orchestrator.tools.compare import engine_count
from orchestrator.tools.deploy import on_free_ports, serve
from orchestrator.tools.loadgen import add_goodput_flag, run_meta, sweep


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


def compare(
    d: Deployment, workload: Workload, loads: Sequence[int], count: int, slo: Slo | None = None
) -> list[dict[str, Any]]:
    """One row per concurrency: served and simulated TTFT/TPOT p50 (and goodput) and the relative errors."""
    real = served(d, workload, loads, count)
    rows = []
    for c in loads:
        run = simulate(d, from_workload(workload, count, salt=f"c{c}"), concurrency=c)
        (rt, rp), (st, sp) = p50(real[c]), p50(run.results)
        row = {
            "deployment": d.name, "concurrency": c, "requests": count,
            "errors_served": sum(not r.ok for r in real[c]), "errors_simulated": run.summary.errors,
            "ttft_p50_served_s": rt, "ttft_p50_simulated_s": st, "ttft_error": error(st, rt),
            "tpot_p50_served_s": rp, "tpot_p50_simulated_s": sp, "tpot_error": error(sp, rp),
        }  # fmt: skip
        if slo is not None:
            gs, gm = steady_goodput(real[c], c, slo), steady_goodput(run.results, c, slo)  # as `disagg plan` counts
            row.update(slo=slo.describe(), goodput_served=gs, goodput_simulated=gm, goodput_error=error(gm, gs))
        rows.append(row)
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
    goodputs = any("goodput_served" in r for r in rows)
    if goodputs:
        lines[0] += " goodput served req/s | simulated | error |"
        lines[1] += "---|---|---|"
    for r in rows:
        line = (
            f"| {r['deployment']} | {r['concurrency']} | {_ms(r['ttft_p50_served_s'])} | {_ms(r['ttft_p50_simulated_s'])} "
            f"| {_pct(r['ttft_error'])} | {_ms(r['tpot_p50_served_s'])} | {_ms(r['tpot_p50_simulated_s'])} "
            f"| {_pct(r['tpot_error'])} |"
        )
        if goodputs:
            line += f" {r.get('goodput_served', 0):.3f} | {r.get('goodput_simulated', 0):.3f} | {_pct(r.get('goodput_error'))} |"
        lines.append(line)
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
    parser.add_argument("--slow-down", type=float, default=1.0,
                        help="serve and simulate the files on GPUs this many times slower (every cost x N): "
                             "a GPU-scale deployment at its planned load in users, within this machine's reach")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="directory for fidelity.json")
    add_goodput_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loads = [int(x) for x in args.concurrency.split(",") if x.strip()]
    workload = Workload(args.isl, args.osl, 0, args.seed)
    rows: list[dict[str, Any]] = []
    for path in args.deployments:
        d = load(path) if args.slow_down == 1.0 else slowed(load(path), args.slow_down)
        rows.extend(compare(d, workload, loads, args.count, args.goodput))
        print(format_rows(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": run_meta(list(argv or []), script="orchestrator/tools/fidelity.py"),
           "workload": workload.describe(), "slow_down": args.slow_down, "rows": rows}  # fmt: skip
    (args.out / "fidelity.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0
