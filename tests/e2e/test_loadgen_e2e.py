"""The load generator against a real tritonserver: tiny sweeps that finish in seconds."""

from __future__ import annotations

import csv
import json
import time

import pytest

from orchestrator.bench.stats import RequestResult, read_csv, read_json, write_csv, write_json
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.loadgen import LengthDist, Workload, main, run_load, sweep
from orchestrator.tools.metrics import wait_released

WORKLOAD = Workload(LengthDist.parse("fixed:16"), LengthDist.parse("fixed:8"), seed=3)


def _assert_complete(results: list[RequestResult], count: int, osl: int = 8, isl: int = 16) -> None:
    assert len(results) == count
    assert [r.error for r in results if not r.ok] == []
    assert len({r.request_id for r in results}) == count
    for r in results:
        assert r.output_tokens == osl, r  # end_id=-1: never an early end
        assert r.input_tokens == isl
        assert r.ttft_s is not None and 0 < r.ttft_s < r.e2e_s
        assert len(r.itl_s) == osl - 1  # one token per streamed response


def test_concurrency_sweep_writes_json_and_csv(server: TritonServer, tmp_path) -> None:
    summaries, results = sweep(
        server.grpc_url, WORKLOAD, [1, 4], "concurrency", count=8, time_limit_s=30, engines=4
    )  # fmt: skip
    assert [(s.mode, s.load, s.count, s.ok, s.errors) for s in summaries] == [
        ("concurrency", 1, 8, 8, 0),
        ("concurrency", 4, 8, 8, 0),
    ]
    for s in summaries:
        _assert_complete(results[s.load], 8)
        assert s.mean_output_tokens == 8 and s.mean_input_tokens == 16
        assert s.output_tokens_per_s_per_engine == s.output_tokens_per_s / 4
        assert s.ttft_p50_s is not None and s.e2e_p50_s is not None and s.ttft_p50_s < s.e2e_p50_s
        assert s.tokens_per_s_per_user is not None and s.tokens_per_s_per_user > 0

    write_json(tmp_path / "sweep.json", summaries, results, {"command": "test"})
    write_csv(tmp_path / "sweep.csv", summaries)
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [s["load"] for s in doc["summaries"]] == [1, 4]
    assert sorted(doc["requests"]) == ["1", "4"] and all(len(v) == 8 for v in doc["requests"].values())
    assert read_json(tmp_path / "sweep.json")[0] == summaries
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["load"] for row in rows] == ["1", "4"]
    assert read_csv(tmp_path / "sweep.csv") == summaries


def test_rate_mode(server: TritonServer) -> None:
    results, summary = run_load(server.grpc_url, WORKLOAD, rate=20.0, count=6, time_limit_s=30)
    _assert_complete(results, 6)
    assert (summary.mode, summary.load, summary.ok) == ("rate", 20.0, 6)
    starts = [r.start_s for r in results]
    assert starts == sorted(starts)  # sent in arrival order


def test_http_protocol(server: TritonServer) -> None:
    results, summary = run_load(server.http_url, WORKLOAD, concurrency=2, count=4, time_limit_s=30, protocol="http")
    _assert_complete(results, 4)
    assert summary.ok == 4


def test_time_limit_ends_sending(server: TritonServer) -> None:
    begun = time.monotonic()
    results, summary = run_load(server.grpc_url, WORKLOAD, concurrency=2, count=10_000, time_limit_s=0.5)
    assert time.monotonic() - begun < 10
    assert 0 < summary.count < 10_000 and summary.errors == 0
    _assert_complete(results, summary.count)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_errors_are_per_request_and_the_worker_carries_on(server: TritonServer, protocol: str) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    mixed = Workload(LengthDist.parse("uniform:4080:4112"), LengthDist.parse("fixed:2"), seed=1)  # max_input_len 4096
    results, summary = run_load(url, mixed, concurrency=2, count=12, time_limit_s=30, protocol=protocol)
    assert summary.count == 12 and 0 < summary.errors < 12
    for r in results:
        if r.input_tokens > 4096:
            assert "INVALID_ARG" in r.error and "max_input_len=4096" in r.error, r.error
        else:
            assert r.ok and r.output_tokens == 2, r


LONG = Workload(LengthDist.parse("fixed:16"), LengthDist.parse("fixed:2000"))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_request_timeout_reports_unfinished_and_stops_them(server: TritonServer, protocol: str) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    results, summary = run_load(
        url, LONG, concurrency=2, count=2, time_limit_s=30, request_timeout_s=0.3, protocol=protocol
    )  # fmt: skip
    assert summary.errors == 2
    assert all(r.error.startswith("unfinished: no final response within 0.3s") for r in results)
    assert all(0 < r.output_tokens < 2000 for r in results)  # they were streaming when cut
    assert wait_released(server.metrics_url, 5.0) == {}  # stopped: 2000 tokens would take ~16 s


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_drain_timeout_ends_the_run(server: TritonServer, protocol: str) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    begun = time.monotonic()
    results, summary = run_load(
        url, LONG, concurrency=2, count=100, time_limit_s=0.2, drain_timeout_s=0.3, protocol=protocol
    )  # fmt: skip
    assert time.monotonic() - begun < 10
    assert summary.count == 2 and summary.errors == 2
    assert all(r.error == "unfinished: still open when the drain timeout ended the run" for r in results)
    assert wait_released(server.metrics_url, 5.0) == {}


def test_cli(server: TritonServer, tmp_path, capsys) -> None:
    rc = main([
        "--url", server.grpc_url, "--concurrency", "1,2", "--count", "3", "--isl", "uniform:8:24", "--osl", "fixed:4",
        "--engines", "4", "--quiet", "--json", str(tmp_path / "o.json"), "--csv", str(tmp_path / "o.csv"),
        "--goodput", "ttft_ms:60000", "tpot_ms:1000",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    assert "TTFT p50" in out[1] and [line.split()[0] for line in out[2:]] == ["1", "2"]
    assert "goodput: ttft_ms:60000 tpot_ms:1000" in out[0] and "goodput req/s" in out[1]
    summaries, requests, meta = read_json(tmp_path / "o.json")
    assert [s.load for s in summaries] == [1, 2] and meta["workload"]["isl"] == "uniform:8:24"
    assert "--concurrency 1,2" in meta["command"]
    for s in summaries:  # generous bounds: every request meets them, so goodput is the request rate
        assert s.ok == 3 and s.goodput_requests_per_s == s.requests_per_s > 0
        assert s.slo == "ttft_ms:60000 tpot_ms:1000"
    assert read_csv(tmp_path / "o.csv") == summaries
