"""Benchmark statistics and workloads on fixed inputs: exact numbers, no server."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from orchestrator.bench.stats import (
    RequestResult,
    Summary,
    load_key,
    percentile,
    read_csv,
    read_json,
    summarize,
    write_csv,
    write_json,
)
from orchestrator.bench.workload import LengthDist, Workload, words_prompt
from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.tools.loadgen import check_loopback, format_table

TOK = BuiltinTokenizer()


# --------------------------------------------------------------------------- percentile


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 25) == 1.75
    assert percentile([4, 1, 3, 2], 0) == 1  # order of the input does not matter
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([0, 10, 20, 30, 40], 75) == 30
    assert percentile(list(range(101)), 99) == 99
    assert percentile([7.5], 0) == percentile([7.5], 50) == percentile([7.5], 100) == 7.5
    assert percentile([2, 2, 2], 90) == 2


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 5) for _ in range(n)]
        for q in (0, 1, 33.3, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("q", [-0.1, 100.1, float("nan")])
def test_percentile_rejects_q_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


# --------------------------------------------------------------------------- one request


def test_result_from_responses_splits_a_multi_token_response_into_equal_gaps() -> None:
    responses = [(10.5, 1), (10.75, 1), (11.75, 4), (12.0, 0)]  # the last: an empty final
    r = RequestResult.from_responses("a", 10.0, responses, 12.0, input_tokens=16)
    assert r.ttft_s == 0.5
    assert r.itl_s == (0.25, 0.25, 0.25, 0.25, 0.25)
    assert r.output_tokens == 6
    assert r.e2e_s == 2.0
    assert r.ok and r.error == ""


def test_result_first_response_tokens_add_no_gaps() -> None:
    r = RequestResult.from_responses("b", 0.0, [(0.0, 0), (1.0, 3), (1.5, 1)], 1.5, input_tokens=4)
    assert r.ttft_s == 1.0  # the empty response before it does not count as the first token
    assert r.itl_s == (0.5,)
    assert r.output_tokens == 4


def test_result_with_an_error_and_no_tokens() -> None:
    r = RequestResult.from_responses("c", 1.0, [], 1.25, input_tokens=8, error="UNAVAILABLE: x")
    assert not r.ok
    assert r.ttft_s is None and r.itl_s == () and r.output_tokens == 0 and r.e2e_s == 0.25


def test_result_refuses_negative_token_counts() -> None:
    with pytest.raises(ValueError):
        RequestResult.from_responses("d", 0.0, [(1.0, -1)], 1.0, input_tokens=1)


# --------------------------------------------------------------------------- summary


def _result(
    rid: str, ttft: float | None, e2e: float, out: int, itl: tuple[float, ...] = (), error: str = ""
) -> RequestResult:
    return RequestResult(rid, 0.0, ttft, itl, e2e, input_tokens=10, output_tokens=out, error=error)


RESULTS = [
    _result("a", 0.5, 2.5, 5, (0.5, 0.5, 0.5, 0.5)),  # (5 - 1) / (2.5 - 0.5) = 2 tok/s
    _result("b", 1.0, 2.0, 5, (0.25, 0.25, 0.25, 0.25)),  # (5 - 1) / (2.0 - 1.0) = 4 tok/s
    _result("c", 0.25, 0.25, 1),  # one token: no TPOT
    _result("d", None, 3.0, 0, error="UNAVAILABLE: engine failed"),
]


def test_summarize_on_fixed_results() -> None:
    s = summarize(RESULTS, duration_s=4.0, engines=4, mode="concurrency", load=2)
    assert (s.mode, s.load, s.count, s.ok, s.errors, s.engines) == ("concurrency", 2, 4, 3, 1, 4)
    assert s.duration_s == 4.0
    assert s.requests_per_s == 0.75  # 3 ok / 4 s
    assert s.output_tokens_per_s == 2.75  # 11 tokens / 4 s
    assert s.output_tokens_per_s_per_engine == 0.6875  # over all 4 engines
    assert s.tokens_per_s_per_user == 3.0  # mean of 2 and 4; "c" and the error are left out
    # TTFT over ok requests [0.25, 0.5, 1.0]
    assert s.ttft_p50_s == 0.5
    assert s.ttft_p90_s == pytest.approx(0.9)
    assert s.ttft_p99_s == pytest.approx(0.99)
    # ITL pooled: four 0.25 and four 0.5
    assert s.itl_p50_s == 0.375
    assert s.itl_p90_s == 0.5 and s.itl_p99_s == 0.5
    # E2E over ok requests [0.25, 2.0, 2.5]
    assert s.e2e_p50_s == 2.0
    assert s.e2e_p90_s == pytest.approx(2.4)
    assert s.mean_input_tokens == 10.0
    assert s.mean_output_tokens == pytest.approx(11 / 3)


def test_summarize_with_no_successful_request() -> None:
    s = summarize([RESULTS[3]], duration_s=1.0, engines=1, mode="rate", load=2.5)
    assert (s.count, s.ok, s.errors) == (1, 0, 1)
    assert s.requests_per_s == 0.0 and s.output_tokens_per_s == 0.0
    assert s.tokens_per_s_per_user is None
    assert s.ttft_p50_s is s.itl_p99_s is s.e2e_p90_s is s.mean_output_tokens is None


def test_summarize_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        summarize(RESULTS, 1.0, 1, "burst", 1)
    with pytest.raises(ValueError, match="engines"):
        summarize(RESULTS, 1.0, 0, "rate", 1)
    with pytest.raises(ValueError, match="duration_s"):
        summarize(RESULTS, 0.0, 1, "rate", 1)


def test_json_and_csv_round_trip(tmp_path) -> None:
    one = summarize(RESULTS, 4.0, 4, "rate", 2.5)
    two = summarize(RESULTS[3:], 1.0, 4, "rate", 8)  # None fields too
    meta = {"command": "orchestrator/tools/loadgen.py --rate 2.5,8", "git_commit": None}
    write_json(tmp_path / "out.json", [one, two], {2.5: RESULTS, 8: RESULTS[3:]}, meta)
    summaries, requests, got_meta = read_json(tmp_path / "out.json")
    assert summaries == [one, two]
    assert requests == {"2.5": RESULTS, "8": RESULTS[3:]}
    assert got_meta == meta
    doc = json.loads((tmp_path / "out.json").read_text())
    assert set(doc) == {"meta", "summaries", "requests"}

    write_csv(tmp_path / "out.csv", [one, two])
    assert read_csv(tmp_path / "out.csv") == [one, two]  # floats survive exactly
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(Summary.__dataclass_fields__)
    assert len(rows) == 3 and rows[2][rows[0].index("ttft_p50_s")] == ""


def test_load_keys() -> None:
    assert [load_key(x) for x in (1, 16, 2.0, 2.5, 0.125)] == ["1", "16", "2", "2.5", "0.125"]


def test_table_has_one_row_per_load() -> None:
    table = format_table([summarize(RESULTS, 4.0, 4, "concurrency", 1), summarize(RESULTS, 2.0, 4, "concurrency", 16)])
    lines = table.splitlines()
    assert len(lines) == 4 and "TTFT p50" in lines[1]
    assert lines[2].split()[0] == "1" and lines[3].split()[0] == "16"
    assert lines[2].split()[-1] == "1/4"  # errors / count


# --------------------------------------------------------------------------- workloads


def test_length_dist_parse() -> None:
    assert LengthDist.parse("fixed:128") == LengthDist("fixed", value=128) == LengthDist.parse("128")
    assert LengthDist.parse("uniform:64:256") == LengthDist("uniform", low=64, high=256)
    assert LengthDist.parse("normal:512:64") == LengthDist("normal", mean=512.0, std=64.0)
    for bad in ("fixed:0", "uniform:9:3", "normal:0:1", "poisson:3", "fixed:x", "uniform:1"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def _draws(dist: LengthDist, seed: int, n: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [dist.sample(rng) for _ in range(n)]


def test_length_dist_samples_are_deterministic_and_in_range() -> None:
    fixed, uniform, normal = (LengthDist.parse(t) for t in ("fixed:7", "uniform:3:9", "normal:4:10"))
    for dist in (fixed, uniform, normal):
        assert _draws(dist, 11) == _draws(dist, 11)  # same seed, same lengths
    assert _draws(uniform, 11) != _draws(uniform, 12)
    assert set(_draws(fixed, 11)) == {7}
    assert set(_draws(uniform, 11)) == set(range(3, 10))  # inclusive bounds, all reached
    assert min(_draws(normal, 11)) == 1  # clipped to >= 1, and the clip is reached at this spread


def test_words_prompt_has_exactly_n_tokens() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 16, 128, 1000):
        assert len(TOK.encode(words_prompt(rng, n))) == n


def test_workload_prompts_have_the_sampled_length() -> None:
    workload = Workload(LengthDist.parse("uniform:1:300"), LengthDist.parse("normal:64:16"), seed=5)
    specs = [spec for spec, _ in zip(workload.requests(), range(100))]
    for spec in specs:
        assert len(TOK.encode(spec.prompt)) == spec.input_tokens
        assert 1 <= spec.input_tokens <= 300 and spec.max_tokens >= 1
    assert len({s.input_tokens for s in specs}) > 50  # the lengths do vary
    again = [spec for spec, _ in zip(Workload(workload.isl, workload.osl, seed=5).requests(), range(100))]
    assert again == specs  # same seed, same requests
    other = [spec for spec, _ in zip(Workload(workload.isl, workload.osl, seed=6).requests(), range(100))]
    assert other != specs
    salted = [spec for spec, _ in zip(workload.requests("concurrency:8"), range(100))]
    assert not {s.prompt for s in salted} & {s.prompt for s in specs}  # another load level: other prompts


def test_workload_shared_prefix_is_identical_across_prompts() -> None:
    workload = Workload(LengthDist.parse("uniform:40:80"), LengthDist.parse("fixed:8"), shared_prefix_tokens=32, seed=1)
    specs = [spec for spec, _ in zip(workload.requests(), range(20))]
    ids = [TOK.encode(s.prompt) for s in specs]
    prefix = ids[0][:32]
    for spec, row in zip(specs, ids):
        assert len(row) == spec.input_tokens
        assert row[:32] == prefix
        assert spec.prompt.startswith(workload.shared_prefix())
    assert len({tuple(row[32:]) for row in ids}) == len(ids)  # the rest differs
    salted = next(workload.requests("rate:4"))
    assert TOK.encode(salted.prompt)[:32] == prefix  # the prefix does not depend on the salt


def test_workload_prompt_is_never_shorter_than_the_prefix_plus_one() -> None:
    workload = Workload(LengthDist.parse("fixed:4"), LengthDist.parse("fixed:2"), shared_prefix_tokens=10)
    spec = next(workload.requests())
    assert spec.input_tokens == 11 and len(TOK.encode(spec.prompt)) == 11


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8001", "localhost:8000", "[::1]:8001", "http://127.0.0.1:8000", "127.0.0.2:1"]
)
def test_loopback_urls_are_accepted(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize("url", ["10.0.0.5:8001", "example.com:8001", "http://192.168.1.2:8000", "[2001:db8::1]:8001"])
def test_remote_urls_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ValueError, match="allow-remote"):
        check_loopback(url)
    check_loopback(url, allow_remote=True)
