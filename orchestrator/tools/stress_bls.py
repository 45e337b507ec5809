"""Reproducer for the BLS stub crash: many long streams through the ensemble, round after round.

Each round starts a fresh tritonserver on the given repository (engines reached over BLS,
as the README serves it), keeps `concurrency` streaming requests in flight on ONE gRPC
stream (`max_tokens` long, `return_num_output_tokens`), sends `requests` in all, and ends
with one verdict:

- `ok`: every request ended with its tokens;
- `died`: a python stub or the server died (Triton answers `Stub process ... is not
  healthy`, the stream's socket closed, or the log shows glibc's heap checks, a fatal
  Python error, a C++ abort or a signal);
- `stalled`: nothing finished for `stall_s` seconds while requests were in flight;
- `failed`: some request ended with another error.

Before the fix in orchestrator/runtime/triton_io.py and orchestrator/runtime/stub_fence.py, about half of
such rounds ended `died` or `stalled` on a 2-core machine (BENCHMARKS.md has the counts).

    disagg stress-bls --rounds 20 [--requests 448] [--concurrency 64] [--json out.json]
    disagg stress-bls --repository OTHER_CHECKOUT/model_repository   # an older commit
    disagg stress-bls --dump-dir stacks/   # gdb stacks of every process of a failed round

Loopback only; bounded by `requests` and `stall_s` per round. Exit status 0 when every
round was `ok`.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.bench.workload import words_prompt
from orchestrator.tools.client import ensemble_inputs
from orchestrator.tools.launch import DEFAULT_REPOSITORY, TritonServer
from orchestrator.tools.stacks import dump_threads

# What a dying stub or server leaves in the log: glibc's heap checks, CPython, a C++ abort (a
# stub's corruption can reach the server through shared memory), a signal other than the
# SIGINT that ends every round.
DEATH_MARKS = re.compile(
    r"malloc|corrupted|double free|free\(\)|Fatal Python error|Segmentation fault|Aborted|not healthy"
    r"|terminate called|Signal \((?!2\))\d+\) received"
)


@dataclass(frozen=True)
class Round:
    """One fresh server's run."""

    verdict: str  # ok | died | stalled | failed
    done: int  # requests that ended (tokens or error)
    errors: int
    seconds: float
    detail: str  # the first error or log line that decided the verdict


def _outcome(done: int, errors: int, first_error: str, stalled: bool, log_text: str, seconds: float) -> Round:
    marks = [line.strip() for line in log_text.splitlines() if DEATH_MARKS.search(line)]
    if marks or "not healthy" in first_error or "Socket closed" in first_error:
        return Round("died", done, errors, seconds, (marks or [first_error])[0][:200])
    if stalled:
        return Round("stalled", done, errors, seconds, f"nothing finished for the stall limit with {done} done")
    if errors:
        return Round("failed", done, errors, seconds, first_error[:200])
    return Round("ok", done, errors, seconds, "")


def run_round(
    repository: Path,
    requests: int,
    concurrency: int,
    isl: int,
    osl: int,
    stall_s: float,
    seed: int,
    dump_dir: Path | None = None,
) -> Round:
    rng = random.Random(seed)
    with TritonServer(model_repository=repository) as server:
        events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        sent = done = errors = 0
        first_error = ""
        stalled = False
        started = time.monotonic()

        def send() -> None:
            nonlocal sent
            inputs = ensemble_inputs(words_prompt(rng, isl), osl, stream=True, end_id=-1, return_num_output_tokens=True)
            client.async_stream_infer("ensemble", inputs, request_id=f"r{sent}", enable_empty_final_response=True)
            sent += 1

        try:
            while sent < min(concurrency, requests):
                send()
            while done < requests:
                try:
                    result, error = events.get(timeout=stall_s)
                except queue.Empty:
                    stalled = True
                    break
                if error is not None:
                    errors += 1
                    first_error = first_error or str(error)
                elif not result.get_response().parameters["triton_final_response"].bool_param:
                    continue
                done += 1
                if sent < requests:
                    send()
        except InferenceServerException as exc:  # the stream broke (its error came to the callback too)
            errors += 1
            first_error = first_error or str(exc)
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        seconds = time.monotonic() - started
        log_text = server.log_path.read_text(errors="replace") if server.log_path else ""
        result = _outcome(done, errors, first_error, stalled, log_text, seconds)
        if dump_dir is not None and result.verdict != "ok" and server.process is not None:
            dump_threads(server.process.pid, dump_dir / f"round-{seed}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=448, help="per round")
    parser.add_argument("--concurrency", type=int, default=64, help="in flight on the one stream")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens")
    parser.add_argument("--osl", type=int, default=64, help="max_tokens")
    parser.add_argument("--stall-s", type=float, default=30.0, help="no request finished for this long: stalled")
    parser.add_argument("--seed", type=int, default=0, help="round k uses seed + k")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dump-dir", type=Path, help="on a failed round, gdb stacks of the server and stubs here")
    args = parser.parse_args(argv)

    rounds: list[Round] = []
    for k in range(args.rounds):
        result = run_round(
            args.repository.resolve(),
            args.requests,
            args.concurrency,
            args.isl,
            args.osl,
            args.stall_s,
            args.seed + k,
            args.dump_dir,
        )
        rounds.append(result)
        print(
            f"round {k + 1}/{args.rounds}: {result.verdict:8} {result.done}/{args.requests} done, "
            f"{result.errors} errors, {result.seconds:.1f}s {result.detail}",
            flush=True,
        )
        if args.stop_on_failure and result.verdict != "ok":
            break
    verdicts = Counter(r.verdict for r in rounds)
    print("summary: " + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": [asdict(r) for r in rounds]}, indent=2
            )
        )
    return 0 if verdicts.get("ok", 0) == len(rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
