"""`disagg plan`: the deployment of a GPU budget that serves most requests within the SLOs.

    disagg plan --isl 8192 --osl 256 --gpus 8 --goodput ttft_ms:2000 tpot_ms:25 --out planned.yaml
    disagg plan --trace mooncake.jsonl --gpus 16 --goodput ttft_ms:2000 tpot_ms:50 --out planned.yaml

Searches aggregated and disaggregated shapes (tensor parallel per pool, engines per pool,
max_batch_size per engine) in the simulator (`orchestrator.sim.planner`), prints every
candidate it simulated, best goodput per GPU first, and writes the best as a deployment
file (`disagg deploy check planned.yaml` accepts it; `disagg simulate` or a served run of
it can be compared with the prediction). Engines are stubs with the stub's cost model
(Llama-3.1-8B BF16 on H100 SXM): for another model or GPU, change the cost model first.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import yaml

from orchestrator.ops.deployment import load
from orchestrator.sim.planner import plan
from orchestrator.sim.requests import from_trace
from orchestrator.sim.shapes import deployment_data
from orchestrator.tools.loadgen import add_goodput_flag


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--isl", type=int, help="input tokens per request (or --trace)")
    parser.add_argument("--osl", type=int, help="output tokens per request (or --trace)")
    parser.add_argument("--trace", type=Path, help="JSON lines: timestamp (ms), input_length, output_length")
    parser.add_argument("--gpus", type=int, required=True, help="GPU budget")
    parser.add_argument("--keep", type=int, default=6, help="disaggregated shapes simulated (best rate-matched)")
    parser.add_argument("--workers", type=int, default=None, help="simulation processes (default: 2)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the best deployment file")
    add_goodput_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.goodput is None:
        parser.error("--goodput is required: the SLOs to plan for, e.g. --goodput ttft_ms:2000 tpot_ms:25")
    trace = from_trace(args.trace) if args.trace is not None else None
    if trace:
        isl = round(sum(r.input_tokens for r in trace) / len(trace))
        osl = max(2, round(sum(r.max_tokens for r in trace) / len(trace)))
    elif args.isl is None or args.osl is None:
        parser.error("give --isl and --osl, or --trace")
    else:
        isl, osl = args.isl, args.osl
    if args.gpus < 1:
        parser.error(f"--gpus must be >= 1, got {args.gpus}")
    candidates = plan(isl, osl, args.goodput, args.gpus, trace, keep=args.keep, workers=args.workers)
    print(f"SLO {args.goodput.describe()}, {args.gpus} GPUs, ISL {isl} / OSL {osl}"
          f"{' (trace means)' if trace else ''}; candidates, best goodput per GPU first:")  # fmt: skip
    for c in candidates:
        print(f"  {c.describe()}")
    best = candidates[0]
    max_input = max([isl, *(r.input_tokens for r in trace or ())])
    data = deployment_data(replace(best.shape), max_input, name="planned")
    header = (
        f"# Planned by `disagg plan` for ISL {isl} / OSL {osl}, SLO {args.goodput.describe()}, {args.gpus} GPUs.\n"
        f"# {best.shape.label}: {best.shape.gpus} GPUs, max_batch_size {best.shape.max_batch_size}.\n"
        f"# Predicted (simulator): goodput {best.goodput:.2f} req/s = {best.goodput_per_gpu:.3f} req/s per GPU "
        f"at {best.users or 'the trace'} {'users' if best.users else ''}".rstrip()
        + "\n"
    )
    args.out.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load(args.out)  # what disagg deploy check runs: the plan must be a valid deployment file
    print(f"best: {best.describe()}\nwrote {args.out}")
    return 0
