"""Drive a simulated deployment with a load and measure each request as a client would.

Loads, as the load generator's (`orchestrator/tools/loadgen.py`): a closed loop of
`concurrency` users, each sending its next request when the last one ended; or open-loop
arrivals at the requests' own times (Poisson, a trace). Each request is measured on the
virtual clock: TTFT (send -> first token, `timing.py`), E2E (send -> final response),
output tokens; `bench.stats.summarize` then gives the same summary as a real run, with
"engines" counting GPUs (every engine's tensor x pipeline parallel size).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.bench.goodput import Slo, tpot_s
from orchestrator.bench.stats import RequestResult, Summary, percentile, summarize
from orchestrator.ops.deployment import Deployment
from orchestrator.serving.pipeline import Orchestrator
from orchestrator.sim.cluster import SimCluster, build
from orchestrator.sim.requests import SimRequest
from orchestrator.sim.virtual_loop import run
from orchestrator.wire.contract import parse_request
from orchestrator.wire.errors import RequestError

# Closed-loop users start this far apart. A real load generator's users never send at the
# same instant; in a deterministic simulation identical users who do would stay in lockstep
# for ever (each batch of arrivals sharing one prefill step), which no served run shows.
USER_STAGGER_S = 0.001


@dataclass(frozen=True, slots=True)
class SimRun:
    """One simulated load level: per-request results, their summary, and what it cost to simulate."""

    summary: Summary
    results: tuple[RequestResult, ...]
    gpus: int
    simulated_s: float  # virtual seconds from the first send to the last answer
    wall_s: float  # real seconds the simulation took
    steps: int  # engine steps simulated, all engines
    paths: tuple[tuple[str, int], ...] = ()  # requests per path: disaggregated, or why served locally

    @property
    def tpot_p50_s(self) -> float | None:
        values = [t for t in (tpot_s(r) for r in self.results if r.ok) if t is not None]
        return percentile(values, 50) if values else None

    def describe(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "simulated_s": self.simulated_s, "wall_s": self.wall_s, "steps": self.steps,
                "tpot_p50_s": self.tpot_p50_s, **self.summary.as_dict()}  # fmt: skip


class _Answer:
    """The orchestrator's response sink for one request: resolves with its final tensors or error."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        if final and not self.future.done():
            self.future.set_result(tensors)

    def fail(self, error: RequestError) -> None:
        if not self.future.done():
            self.future.set_result(error)


def _tensors(req: SimRequest) -> dict[str, np.ndarray]:
    flag = np.array([[True]], dtype=bool)
    return {
        "input_ids": req.input_ids,
        "input_lengths": np.array([[req.input_tokens]], dtype=np.int32),
        "request_output_len": np.array([[req.max_tokens]], dtype=np.int32),
        "streaming": np.array([[False]], dtype=bool),
        "exclude_input_in_output": flag,
        "return_perf_metrics": flag,
    }


async def _one(cluster: SimCluster, orch: Orchestrator, key: str, req: SimRequest) -> RequestResult:
    loop = asyncio.get_running_loop()
    start = loop.time()
    answer = _Answer(loop)
    tensors = _tensors(req)
    try:
        await orch.start(parse_request(tensors, {}, key), tensors, answer)
    except RequestError as exc:  # refused at once (overloaded)
        answer.fail(exc)
    outcome = await answer.future
    end = loop.time()
    first = cluster.timing.take(key)
    if isinstance(outcome, RequestError):
        return RequestResult(key, start, None, (), end - start, req.input_tokens, 0, f"{outcome.code.name}: {outcome}")
    produced = int(outcome["sequence_length"].reshape(-1)[0]) if "sequence_length" in outcome else 0
    ttft = None if first is None else max(0.0, first - start)
    return RequestResult(key, start, ttft, (), end - start, req.input_tokens, produced)


async def _drive(cluster: SimCluster, requests: list[SimRequest], concurrency: int | None) -> list[RequestResult]:
    orchestrators = itertools.cycle(cluster.orchestrators)
    keys = (f"r{i}" for i in itertools.count())
    if concurrency is not None:
        queue = iter(requests)

        async def user(index: int) -> list[RequestResult]:
            await asyncio.sleep(index * USER_STAGGER_S)
            mine = []
            for req in queue:
                mine.append(await _one(cluster, next(orchestrators), next(keys), req))
            return mine

        per_user = await asyncio.gather(*(user(i) for i in range(concurrency)))
        return [r for results in per_user for r in results]
    loop = asyncio.get_running_loop()
    tasks = []
    for req in requests:
        assert req.arrival_s is not None, "open-loop requests need arrival times"
        await asyncio.sleep(max(0.0, req.arrival_s - loop.time()))
        tasks.append(loop.create_task(_one(cluster, next(orchestrators), next(keys), req)))
    return list(await asyncio.gather(*tasks))


def simulate(
    deployment: Deployment, requests: list[SimRequest], concurrency: int | None = None, slo: Slo | None = None,
    check_leaks: bool = True,
) -> SimRun:  # fmt: skip
    """Serve `requests` on `deployment` in virtual time: closed loop of `concurrency` users, or
    (None) open loop at the requests' arrival times. Afterwards nothing may be held anywhere."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    started = time.perf_counter()

    async def main() -> tuple[list[RequestResult], int, int, Counter[str]]:
        cluster = build(deployment)
        try:
            results = await _drive(cluster, requests, concurrency)
            if check_leaks:
                for engine in cluster.engines.values():
                    await engine.wait_idle()
                cluster.check_idle()
            paths: Counter[str] = Counter()
            for orch in cluster.orchestrators:
                paths["disaggregated"] += orch.router.disaggregated
                paths.update(orch.router.local)
            return results, cluster.gpus, sum(e.steps for e in cluster.engines.values()), paths
        finally:
            await cluster.close()

    results, gpus, steps, paths = run(main())
    span = max(r.start_s + r.e2e_s for r in results) - min(r.start_s for r in results)
    mode, load = ("concurrency", float(concurrency)) if concurrency is not None else ("rate", len(results) / span)
    summary = summarize(results, max(span, 1e-9), gpus, mode, load, slo)
    wall = time.perf_counter() - started
    return SimRun(
        summary, tuple(results), gpus, span, wall, steps, tuple(sorted((k, v) for k, v in paths.items() if v))
    )
