"""Orchestrator overhead: the same engines through our orchestrator, through a baseline built
like the reference BLS orchestrator, and a trivial streaming model (the ceiling).

For each engine cost (zero-cost engines, and 10 ms per decode step) one tritonserver
serves a benchmark repository with:

- `orchestrator`: ours, over `context_0` + `generation_0`;
- `baseline_orchestrator`: the reference's design (benchmarks/models/baseline_orchestrator):
  one request at a time per instance, no early first token, over the same two engines;
- `streamer`: one decoupled python model that only streams `request_output_len` one-token
  responses (benchmarks/models/streamer): what Triton + the python backend carry here.

Each target gets the same token-level requests (ISL/OSL fixed) at 1, 16 and 64 in flight;
TTFT overhead compares our orchestrator with calling `context_0` directly at 1 in flight.
Ratios are measured side by side in one run (never against numbers from another day).

    disagg overhead --json overhead.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.bench.stats import RequestResult, Summary
from orchestrator.bench.workload import LengthDist, RequestSpec, Workload
from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.tools.client import token_inputs
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.loadgen import run_load, run_meta
from orchestrator.tools.repository import ModelSpec, write_model

ROOT = Path(__file__).resolve().parents[2]
BENCH_MODELS = ROOT / "benchmarks" / "models"
TARGETS = ("orchestrator", "baseline_orchestrator", "streamer")
COSTS = {"zero": 0.0, "10ms": 10.0}
ZERO_COST = {
    "step_overhead_ms": "0", "prefill_us_per_token": "0", "decode_ms_per_step": "0", "decode_us_per_seq": "0",
    "decode_ns_per_kv_token": "0", "transfer_us_per_token": "0",
}  # fmt: skip


def overhead_repository(dest: Path, token_ms: float) -> Path:
    """The benchmark repository for one engine cost (see the module docstring)."""
    engine = {**ZERO_COST, "decode_ms_per_step": f"{token_ms:g}"}
    write_model(dest, "context_0", ModelSpec("context_0", engine))
    write_model(dest, "generation_0", ModelSpec("generation_0", engine))
    pools = {"context_engines": "context_0", "generation_engines": "generation_0", "health_check_s": "0"}
    write_model(dest, "orchestrator", ModelSpec("orchestrator", pools))
    baseline = {"baseline_context_engine": "context_0", "baseline_generation_engine": "generation_0"}
    write_model(
        dest,
        "baseline_orchestrator",
        ModelSpec("orchestrator", baseline),
        code=BENCH_MODELS / "baseline_orchestrator" / "1",
    )
    write_model(dest, "streamer", ModelSpec("streamer", {"token_delay_ms": f"{token_ms:g}"}), source=BENCH_MODELS)
    return dest


class TokenConnection:
    """A loadgen Connection that speaks the token-level contract (orchestrator, engines)."""

    _TOK = BuiltinTokenizer()

    def __init__(
        self, url: str, model: str, abort: threading.Event, timeout_s: float, parameters: dict[str, str] | None = None
    ) -> None:
        self.model, self.abort, self.timeout_s, self.parameters = model, abort, timeout_s, parameters
        self.replies: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.replies.put((time.monotonic(), result, error)))

    def send(self, request_id: str, spec: RequestSpec, stream: bool) -> RequestResult:
        ids = self._TOK.encode(spec.prompt)
        start = time.monotonic()
        events: list[tuple[float, int]] = []
        self.client.async_stream_infer(
            self.model, token_inputs(ids, spec.max_tokens, streaming=stream), request_id=request_id,
            parameters=self.parameters, enable_empty_final_response=True,
        )  # fmt: skip
        deadline = start + self.timeout_s
        while time.monotonic() < deadline and not self.abort.is_set():
            try:
                arrived, result, error = self.replies.get(timeout=0.05)
            except queue.Empty:
                continue
            if error is not None:
                return RequestResult.from_responses(request_id, start, events, arrived, len(ids), str(error))
            response = result.get_response()
            ids_out = result.as_numpy("output_ids")
            events.append((arrived, 0 if ids_out is None else int(ids_out.shape[-1])))
            if response.parameters["triton_final_response"].bool_param:
                return RequestResult.from_responses(request_id, start, events, arrived, len(ids), "")
        return RequestResult.from_responses(request_id, start, events, time.monotonic(), len(ids), "unfinished")

    def interrupt(self) -> None:
        """send() polls the abort flag."""

    def close(self) -> None:
        with contextlib.suppress(InferenceServerException, Exception):
            self.client.stop_stream()
            self.client.close()


@dataclass(frozen=True)
class Plan:
    isl: int
    osl: int
    loads: tuple[int, ...]
    count: int
    time_limit_s: float


def measure(
    server: TritonServer,
    model: str,
    plan: Plan,
    load: int,
    parameters: dict[str, str] | None = None,
    osl: int | None = None,
) -> Summary:
    workload = Workload(LengthDist.parse(f"fixed:{plan.isl}"), LengthDist.parse(f"fixed:{osl or plan.osl}"), seed=load)

    def connector(abort: threading.Event, timeout_s: float) -> TokenConnection:
        return TokenConnection(server.grpc_url, model, abort, timeout_s, parameters)

    _, summary = run_load(
        server.grpc_url, workload, concurrency=load, count=max(plan.count, load), time_limit_s=plan.time_limit_s,
        connector=connector, salt=f"{model}:{load}",
    )  # fmt: skip
    return summary


def run(plan: Plan, costs: Sequence[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"plan": plan.__dict__, "runs": {}}
    for cost in costs:
        with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
            repo = overhead_repository(Path(tmp), COSTS[cost])
            with TritonServer(model_repository=repo) as server:
                rows: dict[str, dict[str, Any]] = {}
                for target in TARGETS:
                    for load in plan.loads:
                        summary = measure(server, target, plan, load)
                        rows[f"{target}@{load}"] = summary.as_dict()
                        print(
                            f"[{cost}] {target:22s} {load:3d} in flight: {summary.requests_per_s:8.1f} req/s "
                            f"{summary.output_tokens_per_s:9.1f} tok/s  ttft p50 {1e3 * (summary.ttft_p50_s or 0):7.2f} ms",
                            flush=True,
                        )
                direct = measure(server, "context_0", plan, 1, {"request_type": "context_only"}, osl=1)
                ours = measure(server, "orchestrator", plan, 1, osl=1)
                rows["context_direct@1"] = direct.as_dict()
                rows["orchestrator_ttft@1"] = ours.as_dict()
                report["runs"][cost] = rows
    report["ratios"] = ratios(report["runs"], plan.loads)
    return report


def ratios(runs: dict[str, dict[str, Any]], loads: Sequence[int]) -> dict[str, Any]:
    """The issue's targets as measured ratios (same run, same machine)."""
    out: dict[str, Any] = {}
    for cost, rows in runs.items():
        for load in loads:
            ours, base, ceiling = (
                rows[f"orchestrator@{load}"],
                rows[f"baseline_orchestrator@{load}"],
                rows[f"streamer@{load}"],
            )
            out[f"{cost}@{load}"] = {
                "requests_per_s_vs_baseline": ours["requests_per_s"] / max(base["requests_per_s"], 1e-9),
                "tokens_per_s_vs_baseline": ours["output_tokens_per_s"] / max(base["output_tokens_per_s"], 1e-9),
                "tokens_per_s_vs_ceiling": ours["output_tokens_per_s"] / max(ceiling["output_tokens_per_s"], 1e-9),
            }
        direct, ours_ttft = rows["context_direct@1"]["ttft_p50_s"], rows["orchestrator_ttft@1"]["ttft_p50_s"]
        if direct is not None and ours_ttft is not None:
            out[f"{cost}:ttft_added_p50_ms"] = 1e3 * (ours_ttft - direct)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--loads", default="1,16,64")
    parser.add_argument("--count", type=int, default=128, help="requests per target and load (at least the load)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per target and load")
    parser.add_argument("--costs", default="zero,10ms", help=f"engine costs: {','.join(COSTS)}")
    parser.add_argument("--quick", action="store_true", help="a few requests per point (CI smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    loads = tuple(int(x) for x in args.loads.split(","))
    plan = Plan(args.isl, args.osl, loads, 8 if args.quick else args.count, 5.0 if args.quick else args.time_limit)
    report = run(plan, [c.strip() for c in args.costs.split(",")])
    report["meta"] = run_meta(sys.argv if argv is None else ["overhead.py", *argv])
    for key, value in report["ratios"].items():
        print(key, json.dumps(value) if isinstance(value, dict) else f"{value:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
