"""`disagg simulate`: a deployment file under a load, in virtual time (no Triton, no GPU).

    disagg simulate deployments/default.yaml --isl 1024 --osl 128 --concurrency 1,4,16 --count 500
    disagg simulate my.yaml --isl normal:4400:400 --osl 1200 --rate 2,4 --count 2000 --goodput ttft_ms:2000 tpot_ms:25
    disagg simulate my.yaml --trace mooncake.jsonl --time-scale 0.5

The deployment's stub pools run as the engines do under Triton (scheduler, KV blocks, cost
model, KV transfer time) and its orchestrator routes as served (`orchestrator.sim`); a
level prints what `disagg bench` prints against a server, per GPU, plus TPOT p50 and what
the simulation cost. Without a GPU, a deployment's cost model is the stand-in for its GPUs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.ops.deployment import load
from orchestrator.sim.driver import SimRun, simulate
from orchestrator.sim.requests import SimRequest, from_trace, from_workload, poisson_arrivals
from orchestrator.tools.loadgen import add_goodput_flag, format_table


def _loads(text: str, kind: type) -> list[float]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("deployment", type=Path, help="a deployment file (stub pools), as for disagg deploy")
    loads = parser.add_mutually_exclusive_group(required=True)
    loads.add_argument("--concurrency", type=lambda t: _loads(t, int), help="closed loop users: e.g. 1,16,64")
    loads.add_argument("--rate", type=lambda t: _loads(t, float), help="Poisson arrivals, requests/s: e.g. 2,4")
    loads.add_argument("--trace", type=Path, help="JSON lines: timestamp (ms), input_length, output_length[, hash_ids]")
    parser.add_argument("--isl", type=LengthDist.parse, default=LengthDist.parse("fixed:1024"), help="input tokens")
    parser.add_argument("--osl", type=LengthDist.parse, default=LengthDist.parse("fixed:128"), help="output tokens")
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=500, help="requests per level (a trace: at most this many)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="a trace's timestamps multiplied by this")
    parser.add_argument("--json", type=Path, help="write every level's summary and simulation cost")
    add_goodput_flag(parser)
    return parser


def levels(args: argparse.Namespace) -> list[tuple[int | None, list[SimRequest], float]]:
    """(concurrency or None, requests, load) per level, from the parsed arguments."""
    if args.trace is not None:
        reqs = from_trace(args.trace, args.count, args.time_scale)
        return [(None, reqs, 0.0)]
    workload = Workload(args.isl, args.osl, args.shared_prefix, args.seed)
    if args.concurrency is not None:
        return [(int(c), from_workload(workload, args.count, salt=f"c{c}"), c) for c in args.concurrency]
    return [(None, poisson_arrivals(from_workload(workload, args.count, f"r{r}"), r, args.seed), r) for r in args.rate]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    deployment = load(args.deployment)
    runs: list[SimRun] = []
    for concurrency, requests, _load in levels(args):
        runs.append(simulate(deployment, requests, concurrency, slo=args.goodput))
    gpus = runs[0].gpus
    print(f"== {deployment.name}: {gpus} GPUs (simulated; per-engine columns are per GPU)")
    print(format_table([r.summary for r in runs]))
    for run in runs:
        tpot = run.tpot_p50_s
        print(
            f"load {run.summary.load:g}: TPOT p50 {'-' if tpot is None else f'{tpot * 1e3:.2f}'} ms; "
            f"{run.simulated_s:.1f} s simulated in {run.wall_s:.1f} s ({run.steps} engine steps)"
        )
    if args.json is not None:
        doc = {"deployment": str(args.deployment), "levels": [r.describe() for r in runs]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0
