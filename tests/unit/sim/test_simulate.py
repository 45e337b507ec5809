"""The simulator runs our engines and orchestrator on deployment files; its timings follow
the cost model exactly where the arithmetic is known, and nothing leaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bench.goodput import Slo
from orchestrator.bench.workload import LengthDist, Workload
from orchestrator.ops.deployment import Deployment, load, parse
from orchestrator.sim.driver import simulate
from orchestrator.sim.requests import from_trace, from_workload, poisson_arrivals
from orchestrator.sim.shapes import slowed
from orchestrator.stub_engine.config import EngineConfig

COSTS = {"step_overhead_ms": 0.5, "prefill_us_per_token": 32, "decode_ms_per_step": 6, "decode_us_per_seq": 32,
         "decode_ns_per_kv_token": 49, "transfer_us_per_token": 5.2}  # fmt: skip


def deployment(context: int = 0, generation: int = 1, ctx_tp: int = 1, **settings: Any) -> Deployment:
    pools: dict[str, Any] = {"generation": {"engines": generation, "max_input_len": 4096, "stub": dict(COSTS)}}
    if context:
        pools["context"] = {"engines": context, "max_input_len": 4096, "tensor_parallel": ctx_tp, "stub": dict(COSTS)}
    routing: dict[str, Any] = {k: v for k, v in settings.items() if k in ("local_prefill_max_tokens",)}
    return parse({"name": "t", "pools": pools, "routing": routing})


def requests(isl: int, osl: int, count: int, shared: int = 0) -> list[Any]:
    return from_workload(Workload(LengthDist("fixed", isl), LengthDist("fixed", osl), shared), count)


def test_one_user_on_one_aggregated_engine_gets_the_cost_models_times() -> None:
    run = simulate(deployment(), requests(1000, 100, 5), concurrency=1)
    cost = EngineConfig(**COSTS)  # type: ignore[arg-type]
    assert run.summary.errors == 0 and run.summary.count == 5 and run.gpus == 1
    assert run.summary.ttft_p50_s == pytest.approx(cost.step_seconds(1000, 0))  # a prefill step alone
    steps = [cost.step_seconds(0, 1, kv_tokens=1000 + i) for i in range(1, 100)]  # each decode attends one more
    assert run.tpot_p50_s == pytest.approx(sum(steps) / len(steps))
    assert run.summary.mean_output_tokens == 100


def test_disaggregated_ttft_is_the_context_engines_prefill_with_tensor_parallelism() -> None:
    d = deployment(context=1, generation=1, ctx_tp=2)
    run = simulate(d, requests(2048, 16, 4), concurrency=1)
    tp2 = EngineConfig(**COSTS, tensor_parallel_size=2)  # type: ignore[arg-type]
    assert run.gpus == 3 and run.summary.errors == 0
    assert run.summary.ttft_p50_s == pytest.approx(tp2.step_seconds(2048, 0))
    assert run.paths == (("disaggregated", 4),)
    # the generation engine pulls the KV (5.2 us/token) before its first decode step
    gen = EngineConfig(**COSTS)  # type: ignore[arg-type]
    assert run.tpot_p50_s is not None and run.tpot_p50_s > gen.step_seconds(0, 1, kv_tokens=2048)


def test_conditional_disaggregation_serves_short_prompts_on_the_generation_engine() -> None:
    d = deployment(context=1, generation=1, local_prefill_max_tokens=512)
    run = simulate(d, requests(256, 8, 6) + requests(1024, 8, 4), concurrency=2)
    assert dict(run.paths) == {"short_prompt": 6, "disaggregated": 4}


def test_a_batch_limit_makes_users_queue() -> None:
    small = parse({"name": "t", "pools": {"generation": {"engines": 1, "max_batch_size": 2, "stub": dict(COSTS)}}})
    large = parse({"name": "t", "pools": {"generation": {"engines": 1, "max_batch_size": 8, "stub": dict(COSTS)}}})
    reqs = requests(512, 64, 16)
    queued, batched = simulate(small, reqs, concurrency=8), simulate(large, reqs, concurrency=8)
    assert queued.summary.ttft_p50_s > 2 * batched.summary.ttft_p50_s  # type: ignore[operator]
    assert queued.summary.requests_per_s < batched.summary.requests_per_s


def test_goodput_counts_requests_within_the_slo() -> None:
    reqs = requests(1000, 50, 8)
    ttft = EngineConfig(**COSTS).step_seconds(1000, 0)  # type: ignore[arg-type]
    easy = simulate(deployment(), reqs, concurrency=1, slo=Slo(ttft_ms=ttft * 1e3 + 1))
    hard = simulate(deployment(), reqs, concurrency=1, slo=Slo(ttft_ms=ttft * 1e3 - 1))
    assert easy.summary.goodput_requests_per_s == pytest.approx(easy.summary.requests_per_s)
    assert hard.summary.goodput_requests_per_s == 0


def test_poisson_arrivals_at_a_low_rate_see_no_queueing() -> None:
    reqs = poisson_arrivals(requests(512, 16, 40), rate=0.5, seed=3)
    run = simulate(deployment(generation=2), reqs)
    assert run.summary.mode == "rate" and run.summary.errors == 0
    assert run.summary.requests_per_s == pytest.approx(0.5, rel=0.35)
    cost = EngineConfig(**COSTS)  # type: ignore[arg-type]
    assert run.summary.ttft_p50_s == pytest.approx(cost.step_seconds(512, 0))


def test_a_trace_with_shared_hash_ids_reuses_the_cached_prefix(tmp_path: Path) -> None:
    lines = [{"timestamp": 1000 * i, "input_length": 2048, "output_length": 4, "hash_ids": [7, 8, 9]} for i in range(4)]
    lines += [{"timestamp": 5000 + 1000 * i, "input_length": 2048, "output_length": 4} for i in range(4)]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = simulate(deployment(), from_trace(path))
    shared, own = run.results[1:4], run.results[4:]
    # 1536 of 2048 tokens named by the hash ids: later requests prefill 512 tokens, unrelated ones 2048
    assert max(r.ttft_s for r in shared) < 0.5 * min(r.ttft_s for r in own)  # type: ignore[type-var,operator]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"timestamp": 0, "input_length": 5}', "needs timestamp"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 5}', "must be >= 1"),
        ("not json", "needs timestamp"),
    ],
)
def test_a_bad_trace_line_names_its_place(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:1: .*{message}"):
        from_trace(path)


def test_a_real_engine_pool_is_refused_with_the_reason() -> None:
    d = load(Path(__file__).resolve().parents[3] / "deployments" / "trtllm-1ctx-1gen.yaml")
    with pytest.raises(ValueError, match=r"pools\.\w+: the simulator runs stub engines only"):
        simulate(d, requests(8, 2, 1), concurrency=1)


def test_a_slowed_deployment_takes_every_modelled_time_times_the_factor() -> None:
    d = deployment(context=1, generation=1, ctx_tp=2)
    reqs = requests(1024, 32, 4)
    base, slow = simulate(d, reqs, concurrency=1), simulate(slowed(d, 4.0), reqs, concurrency=1)
    assert slow.summary.ttft_p50_s == pytest.approx(4 * base.summary.ttft_p50_s)  # type: ignore[operator]
    assert slow.tpot_p50_s == pytest.approx(4 * base.tpot_p50_s)  # type: ignore[operator]
    assert slow.summary.requests_per_s == pytest.approx(base.summary.requests_per_s / 4)
    with pytest.raises(ValueError, match="must be > 0"):
        slowed(d, 0)


def test_the_simulate_command_prints_a_table_per_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.tools import simulate as simulate_tool

    out = tmp_path / "run.json"
    rc = simulate_tool.main([str(Path(__file__).resolve().parents[3] / "deployments" / "default.yaml"),
                             "--isl", "256", "--osl", "8", "--concurrency", "1,2", "--count", "6",
                             "--json", str(out), "--goodput", "ttft_ms:1000"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "6 GPUs" in printed and "goodput req/s" in printed and "TPOT p50" in printed
    levels = json.loads(out.read_text())["levels"]
    assert [lv["load"] for lv in levels] == [1, 2] and all(lv["errors"] == 0 for lv in levels)
