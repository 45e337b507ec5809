"""`disagg pareto`: aggregated vs disaggregated at GPU scale, in the simulator.

    disagg pareto --workload 8192:256 --workload 4400:1200 --workload 4096:1024 --out benchmarks/results/pareto

Per workload (ISL:OSL): phase sweeps and rate matching for tensor-parallel sizes 1-8,
aggregated engines with chunked context end to end, disaggregated shapes end to end
(`orchestrator.sim.study`); writes OUT/pareto-ISL-OSL.json and .png, prints the frontiers
and the speedups at fixed tokens/s per user. Several minutes per workload on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from orchestrator.sim.study import run_study
from orchestrator.tools.loadgen import run_meta
from orchestrator.tools.plots import plot_pareto

# The seed's figures for each workload (quoted in BENCHMARKS.md), shown on the charts.
SEED = {(4400, 1200): "1.4-1.8x", (8192, 256): "up to 1.73x (tp4 generation), 2x (tp8)"}


def _workload(text: str) -> tuple[int, int]:
    try:
        isl, osl = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a workload is ISL:OSL, e.g. 8192:256; got {text!r}") from None
    if isl < 1 or osl < 2:
        raise argparse.ArgumentTypeError(
            f"a workload needs ISL >= 1 and OSL >= 2 (per-user speed needs 2 tokens): {text!r}"
        )
    return isl, osl


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg pareto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workload", type=_workload, action="append", required=True, help="ISL:OSL (repeatable)")
    parser.add_argument("--ttft-bound-ms", type=float, default=2000.0,
                        help="a context engine's capacity: its best rate with TTFT p50 within this")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="simulation processes (default: every CPU)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def report(study: dict[str, Any]) -> str:
    lines = [f"ISL {study['isl']} / OSL {study['osl']}"]
    for kind, pts in study["frontiers"].items():
        row = ", ".join(f"{p['shape']} k={p['k']}: {p['tokens_per_s_per_user']:.0f}/{p['tokens_per_s_per_gpu']:.0f}"
                        for p in pts)  # fmt: skip
        lines.append(f"  {kind} frontier (tok/s/user / tok/s/GPU): {row}")
    lines.append("  | tok/s/user | agg tok/s/GPU | rate-matched | speedup | end to end | speedup | e2e gap |")
    for r in study["speedups"]["rows"]:

        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v * 100:.0f}%"

        lines.append(f"  | {r['tokens_per_s_per_user']:.0f} | {_ms(r['aggregated'])} | {_ms(r['rate_matched'])} | "
                     f"{x(r['rate_matched_speedup'])} | {_ms(r['end_to_end'])} | {x(r['end_to_end_speedup'])} | "
                     f"{pct(r['end_to_end_gap'])} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for isl, osl in args.workload:
        started = time.perf_counter()
        study = run_study(isl, osl, args.ttft_bound_ms / 1e3, workers=args.workers).as_dict()
        study["meta"] = run_meta(list(argv or []), script="disagg pareto", wall_s=time.perf_counter() - started)
        base = args.out / f"pareto-{isl}-{osl}"
        base.with_suffix(".json").write_text(json.dumps(study, indent=1) + "\n", encoding="utf-8")
        plot_pareto(study, base.with_suffix(".png"), SEED.get((isl, osl), ""))
        print(report(study), flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s; {base}.json, {base}.png)", flush=True)
    return 0
