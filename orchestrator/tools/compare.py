"""Aggregated vs disaggregated at equal engine count, and rate matching, in one command.

    disagg compare deployments/aggregated.yaml deployments/default.yaml \\
        --isl 1024 --osl 128 --concurrency 1,4,16 --count 48 --out bench/compare \\
        [--goodput ttft_ms:2000 tpot_ms:25]

For each deployment file: build its repositories (orchestrator/tools/deploy.py), start its servers on
free loopback ports, run a closed-loop concurrency sweep through the ensemble (gRPC
streaming, the same prompts for every deployment), stop the servers. Throughput per engine
divides by every engine of the deployment. With --goodput, every end-to-end level also
reports its goodput (requests/s meeting every bound) and that per engine.

Then the phase sweeps of rate matching (unless --no-phase-sweeps), on one engine of each
phase of the first disaggregated deployment, with its stub knobs:
- context-only: `context_only` requests straight to a context engine (one output token),
  closed loop at --context-concurrency; each KV lease is dropped at once (request
  parameter fault=drop_lease), as no generation engine will pull it. Capacity: the best
  requests/s whose TTFT p50 stays within --ttft-bound-ms.
- generation-only: whole requests to an engine with the generation pool's knobs but free
  prefill (prefill_us_per_token=0), so what is measured is decoding at each concurrency:
  tokens/s and tokens/s per user.
`orchestrator.bench.rate_matching` combines them into the best c:g for up to as many engines as
the deployments have, and the Pareto frontier.

Writes OUT/compare.json (everything), OUT/<deployment>.csv (one row per concurrency),
OUT/compare.png (both deployments' curves and the rate-matched points).

On a terminal, stderr shows a bar of the load levels done and one of each level's requests
(--progress / --no-progress to choose); stdout and the files are the same either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.bench.goodput import Slo
from orchestrator.bench.rate_matching import ContextPoint, GenerationPoint, best_ratios, context_capacity, pareto
from orchestrator.bench.stats import Summary, write_csv
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.ops.deployment import Deployment, Pool, load
from orchestrator.stub_engine.config import PREFILL_COST_KNOBS
from orchestrator.tools.deploy import on_free_ports, serve
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.loadgen import add_goodput_flag, format_table, run_load, run_meta, sweep
from orchestrator.tools.overhead import TokenConnection
from orchestrator.tools.plots import plot_compare
from orchestrator.tools.progress import add_progress_flag, echo, progress
from orchestrator.tools.repository import ModelSpec, write_model


def engine_count(d: Deployment) -> int:
    return sum(p.engines for p in d.pools)


def shape(d: Deployment) -> str:
    context, generation = d.pool("context"), d.pool("generation")
    assert generation is not None
    return f"agg{generation.engines}" if context is None else f"c{context.engines}g{generation.engines}"


def end_to_end(
    d: Deployment, workload: Workload, loads: Sequence[float], count: int, time_limit_s: float,
    request_timeout_s: float = 120.0, mode: str = "concurrency", progress: bool | None = None,
    on_level: Callable[[Summary], None] | None = None, slo: Slo | None = None,
) -> list[Summary]:  # fmt: skip
    """Serve `d`, sweep it, stop it. `progress`: a bar per level on stderr (None: only on a
    terminal); `on_level(summary)` as each level ends; `slo`: each level's goodput counts the
    requests within it."""
    with tempfile.TemporaryDirectory(prefix=f"compare-{d.name}-") as tmp, ExitStack() as stack:
        free = on_free_ports(d)
        frontend = serve(free, Path(tmp), stack)[free.frontend]
        summaries, _ = sweep(
            frontend.grpc_url, workload, loads, mode, count=count, time_limit_s=time_limit_s,
            engines=engine_count(d), progress=progress, request_timeout_s=request_timeout_s, on_level=on_level,
            slo=slo,
        )  # fmt: skip
    return summaries


def _probe_repository(dest: Path, context: Pool, generation: Pool) -> Path:
    write_model(dest, "context_0", ModelSpec("context_0", context.stub))
    free_prefill = dict.fromkeys(PREFILL_COST_KNOBS, "0")
    write_model(dest, "generation_probe", ModelSpec("generation_0", {**generation.stub, **free_prefill}))
    return dest


def phase_sweeps(
    d: Deployment, workload: Workload, context_loads: Sequence[int], generation_loads: Sequence[int], count: int,
    time_limit_s: float, progress: bool | None = False, on_level: Callable[[Summary], None] | None = None,
) -> tuple[list[ContextPoint], list[GenerationPoint], dict[str, Any]]:  # fmt: skip
    context, generation = d.pool("context"), d.pool("generation")
    assert context is not None and generation is not None
    raw: dict[str, Any] = {"context": [], "generation": []}
    ctx_points: list[ContextPoint] = []
    gen_points: list[GenerationPoint] = []
    with (
        tempfile.TemporaryDirectory(prefix="phases-") as tmp,
        TritonServer(model_repository=_probe_repository(Path(tmp), context, generation)) as srv,
    ):

        def measure(model: str, params: dict[str, str] | None, osl: int, k: int) -> Summary:
            wl = replace(workload, osl=LengthDist.parse(f"fixed:{osl}")) if osl else workload

            def connector(abort: threading.Event, timeout_s: float) -> TokenConnection:
                return TokenConnection(srv.grpc_url, model, abort, timeout_s, params)

            _, summary = run_load(srv.grpc_url, wl, concurrency=k, count=max(count, 2 * k), time_limit_s=time_limit_s,
                                  connector=connector, salt=f"{model}:{k}", progress=progress)  # fmt: skip
            if on_level is not None:
                on_level(summary)
            return summary

        for k in context_loads:
            s = measure("context_0", {"request_type": "context_only", "fault": "drop_lease"}, 1, k)
            raw["context"].append(s.as_dict())
            if s.ok and s.ttft_p50_s is not None:
                ctx_points.append(ContextPoint(k, s.requests_per_s, s.ttft_p50_s))
        for k in generation_loads:
            s = measure("generation_probe", None, 0, k)
            raw["generation"].append(s.as_dict())
            if s.ok and s.tokens_per_s_per_user is not None:
                gen_points.append(GenerationPoint(k, s.output_tokens_per_s, s.tokens_per_s_per_user))
    return ctx_points, gen_points, raw


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _dist(text: str) -> LengthDist:
    """A bare number is a fixed length, so `--isl 1024` works as `--isl fixed:1024`."""
    return LengthDist.parse(text if ":" in text else f"fixed:{text}")


def _parser() -> argparse.ArgumentParser:
    """The command line; kept apart from `main` so `main` reads as the run it drives."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deployments", nargs="+", type=Path, help="deployment files (same engine count)")
    parser.add_argument("--isl", default="fixed:1024", help="input length: N, fixed:N, uniform:A:B, normal:MEAN:STD")
    parser.add_argument("--osl", default="fixed:128", help="output length, as --isl")
    parser.add_argument(
        "--concurrency", default="1,4,16", help="closed-loop levels, comma-separated (also the generation-only sweep's)"
    )
    parser.add_argument(
        "--rate", default="", help="open-loop Poisson rates (requests/s) for the end-to-end runs instead"
    )
    parser.add_argument("--context-concurrency", default="1,2,4,8")
    parser.add_argument(
        "--count", type=int, default=48, help="requests per level (at least 2x the level in phase sweeps)"
    )
    parser.add_argument("--time-limit-s", type=float, default=120.0, help="per level")
    parser.add_argument("--ttft-bound-ms", type=float, default=1000.0, help="context capacity: TTFT p50 within this")
    parser.add_argument(
        "--request-timeout-s", type=float, default=120.0, help="a request unanswered this long counts as an error"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-phase-sweeps", action="store_true")
    parser.add_argument(
        "--engines-over", choices=("bls", "grpc"), help="override every deployment's orchestrator.engines_over"
    )
    parser.add_argument("--allow-unequal", action="store_true", help="compare deployments of different engine counts")
    parser.add_argument("--out", type=Path, required=True)
    add_progress_flag(parser)
    add_goodput_flag(parser)
    return parser


def _deployment_run(
    d: Deployment, workload: Workload, e2e_loads: Sequence[float], mode: str, args: argparse.Namespace,
    level_done: Callable[[Summary], None],
) -> dict[str, Any]:  # fmt: skip
    """One deployment's end-to-end sweep: its table on stdout, its CSV, its part of the report."""
    echo(f"== {d.name} ({shape(d)}, {engine_count(d)} engines)")
    summaries = end_to_end(
        d, workload, e2e_loads, args.count, args.time_limit_s, args.request_timeout_s, mode,
        progress=args.progress, on_level=level_done, slo=args.goodput,
    )  # fmt: skip
    echo(format_table(summaries))
    entry: dict[str, Any] = {
        "shape": shape(d),
        "engines": engine_count(d),
        "summaries": [s.as_dict() for s in summaries],
    }
    if args.goodput is not None:
        entry["goodput"] = _goodput_section(summaries, args.goodput)
    write_csv(args.out / f"{d.name}.csv", summaries)
    return entry


def _goodput_section(summaries: Sequence[Summary], slo: Slo) -> dict[str, Any]:
    """A deployment's goodput per level, per engine too (the summaries carry the totals)."""
    return {
        "slo": slo.describe(),
        "levels": [
            {
                "load": s.load,
                "goodput_requests_per_s": s.goodput_requests_per_s,
                "goodput_requests_per_s_per_engine": None
                if s.goodput_requests_per_s is None
                else s.goodput_requests_per_s / s.engines,
            }
            for s in summaries
        ],
    }


def _rate_matching(
    disagg: Deployment, workload: Workload, context_loads: Sequence[int], loads: Sequence[int],
    args: argparse.Namespace, max_engines: int, level_done: Callable[[Summary], None],
) -> dict[str, Any]:  # fmt: skip
    """The phase sweeps of `disagg` and the best c:g they give: the report's `rate_matching`."""
    echo("== phase sweeps (rate matching)")
    ctx, gen, raw = phase_sweeps(
        disagg, workload, context_loads, loads, args.count, args.time_limit_s, args.progress, level_done
    )
    osl = max(1, round(workload.osl.expected))
    capacity = context_capacity(ctx, args.ttft_bound_ms / 1000)
    points = best_ratios(capacity, gen, osl, max_engines) if capacity > 0 else []
    section = {
        "ttft_bound_ms": args.ttft_bound_ms, "context_requests_per_s": capacity, "osl": osl,
        "context_points": [asdict(p) for p in ctx], "generation_points": [asdict(p) for p in gen],
        "points": [{**asdict(p), "label": p.label} for p in points],
        "pareto": [{**asdict(p), "label": p.label} for p in pareto(points)], "raw": raw,
    }  # fmt: skip
    for p in points:
        echo(f"  k={p.concurrency:3d} best {p.label}: {p.tokens_per_s_per_engine:8.1f} tok/s/engine "
             f"{p.tokens_per_s_per_user:7.1f} tok/s/user (limited by {p.bottleneck})")  # fmt: skip
    return section


def _write_report(report: dict[str, Any], out: Path) -> None:
    """compare.json and compare.png, written once every run is done (the CSVs are written as they end)."""
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    plot_compare(report, out / "compare.png")
    print(f"wrote {out}/compare.json, compare.png and one CSV per deployment")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    deployments = [load(p) for p in args.deployments]
    if args.engines_over:
        deployments = [replace(d, engines_over=args.engines_over) for d in deployments]
    counts = {d.name: engine_count(d) for d in deployments}
    if len(set(counts.values())) > 1 and not args.allow_unequal:
        print(
            f"error: engine counts differ {counts}: a fair comparison uses the same number (or --allow-unequal)",
            file=sys.stderr,
        )
        return 2

    workload = Workload(_dist(args.isl), _dist(args.osl), seed=args.seed)
    loads = _ints(args.concurrency)
    mode, e2e_loads = (
        ("rate", [float(x) for x in args.rate.split(",") if x.strip()]) if args.rate else ("concurrency", loads)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "meta": run_meta(sys.argv[1:] if argv is None else list(argv), "orchestrator/tools/compare.py"),
        "workload": workload.describe(),
        "mode": mode,
        "slo": "" if args.goodput is None else args.goodput.describe(),
        "engines_over": [d.engines_over for d in deployments],
        "deployments": {},
    }
    disagg = next((d for d in deployments if d.pool("context") is not None), None)
    phases = disagg is not None and not args.no_phase_sweeps
    context_loads = _ints(args.context_concurrency)
    levels = len(deployments) * len(e2e_loads) + (len(context_loads) + len(loads) if phases else 0)
    # A bar of load levels (each level has a bar of its requests below it); stdout as without.
    with progress(levels, "compare", enabled=args.progress, unit="level") as bar:

        def level_done(_summary: Summary) -> None:
            bar.update()

        for d in deployments:
            bar.note(d.name)
            report["deployments"][d.name] = _deployment_run(d, workload, e2e_loads, mode, args, level_done)
        if disagg is not None and phases:
            bar.note("phase sweeps")
            report["rate_matching"] = _rate_matching(
                disagg, workload, context_loads, loads, args, max(counts.values()), level_done
            )
    _write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
