"""SLA goodput on crafted requests: parsing an SLO, meeting it at its exact bounds, the rate,
the summaries that carry it (old files without it still read), and the `--goodput` flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.bench.goodput import Slo, goodput, tpot_s
from orchestrator.bench.stats import RequestResult, Summary, read_csv, read_json, summarize, write_csv, write_json
from orchestrator.tools import compare, loadgen

REPO = Path(__file__).resolve().parents[3]
KEYS = "ttft_ms, tpot_ms, itl_ms, e2e_ms"


def _result(
    ttft: float | None, e2e: float, out: int, itl: tuple[float, ...] = (), error: str = "", rid: str = "r"
) -> RequestResult:
    return RequestResult(rid, 0.0, ttft, itl, e2e, input_tokens=8, output_tokens=out, error=error)


# --------------------------------------------------------------------------- parse / describe


def test_parse_reads_each_key() -> None:
    assert Slo.parse(["ttft_ms:2000", "tpot_ms:25"]) == Slo(ttft_ms=2000, tpot_ms=25)
    assert Slo.parse(["e2e_ms:1500.5", "itl_ms:40"]) == Slo(itl_ms=40, e2e_ms=1500.5)
    assert Slo.parse(["tpot_ms:1e2"]) == Slo(tpot_ms=100)


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("ttft:2000", "unknown key 'ttft'"),
        ("TTFT_MS:2000", "unknown key"),
        ("ttft_ms", "not KEY:VALUE"),
        ("ttft_ms=2000", "not KEY:VALUE"),
        ("ttft_ms:fast", "not a number"),
        ("ttft_ms:", "not a number"),
        ("ttft_ms:0", "> 0"),
        ("tpot_ms:-25", "> 0"),
        ("itl_ms:nan", "> 0"),
        ("e2e_ms:inf", "> 0"),
    ],
)
def test_parse_refuses_a_bad_item_naming_it_and_the_keys(item: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        Slo.parse(["e2e_ms:9000", item])
    message = str(info.value)
    assert repr(item) in message and why in message and KEYS in message


def test_parse_refuses_a_key_given_twice_and_no_item() -> None:
    with pytest.raises(ValueError, match=r"'ttft_ms:3000': ttft_ms is given twice") as info:
        Slo.parse(["ttft_ms:2000", "tpot_ms:25", "ttft_ms:3000"])
    assert KEYS in str(info.value)
    with pytest.raises(ValueError, match="no SLO given") as info:
        Slo.parse([])
    assert KEYS in str(info.value)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_a_bound_built_directly_is_checked_too(bad: float) -> None:
    with pytest.raises(ValueError, match="SLO itl_ms must be"):
        Slo(itl_ms=bad)


def test_describe_and_empty() -> None:
    assert Slo(ttft_ms=2000, tpot_ms=25).describe() == "ttft_ms:2000 tpot_ms:25"
    assert Slo(e2e_ms=0.5, ttft_ms=12.25).describe() == "ttft_ms:12.25 e2e_ms:0.5"  # field order, not call order
    assert Slo().describe() == "" and Slo().empty
    assert not Slo(e2e_ms=1).empty


_bound = st.none() | st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(_bound, _bound, _bound, _bound)
def test_describe_round_trips_through_parse(
    ttft: float | None, tpot: float | None, itl: float | None, e2e: float | None
) -> None:
    slo = Slo(ttft, tpot, itl, e2e)
    if not slo.empty:
        assert Slo.parse(slo.describe().split()) == slo


# --------------------------------------------------------------------------- meets


def test_ttft_bound_is_inclusive_and_exact_in_milliseconds() -> None:
    r = _result(2.007, 3.0, 4, (0.3, 0.3, 0.3))  # 2.007 * 1000 > 2007 in floats: compared in seconds
    assert Slo(ttft_ms=2007).meets(r)
    assert not Slo(ttft_ms=2006.9).meets(r)


def test_tpot_bound_is_inclusive() -> None:
    r = _result(0.5, 1.0, 3, (0.1, 0.4))  # (1.0 - 0.5) / (3 - 1) = 0.25 s
    assert tpot_s(r) == 0.25
    assert Slo(tpot_ms=250).meets(r)
    assert not Slo(tpot_ms=249.9).meets(r)


def test_itl_bound_holds_for_every_gap_not_the_mean() -> None:
    r = _result(0.25, 1.0, 4, (0.125, 0.375, 0.25))  # mean gap (TPOT) 0.25 s, max 0.375 s
    assert Slo(itl_ms=375).meets(r)
    assert not Slo(itl_ms=374).meets(r)
    assert Slo(tpot_ms=250).meets(r)  # the mean is what TPOT bounds


def test_e2e_bound_is_inclusive() -> None:
    r = _result(0.25, 1.5, 2, (1.25,))
    assert Slo(e2e_ms=1500).meets(r)
    assert not Slo(e2e_ms=1499.99).meets(r)


def test_every_bound_must_hold() -> None:
    r = _result(0.5, 1.0, 3, (0.25, 0.25))
    assert Slo(ttft_ms=500, tpot_ms=250, itl_ms=250, e2e_ms=1000).meets(r)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):  # one bound too tight is enough to miss
        bounds = {"ttft_ms": 500.0, "tpot_ms": 250.0, "itl_ms": 250.0, "e2e_ms": 1000.0}
        bounds[key] -= 1
        assert not Slo(**bounds).meets(r), key


def test_one_token_meets_tpot_and_itl_vacuously() -> None:
    one = _result(0.2, 0.2, 1)
    assert tpot_s(one) is None
    assert Slo(tpot_ms=0.001, itl_ms=0.001).meets(one)
    assert not Slo(tpot_ms=0.001, ttft_ms=100).meets(one)  # the TTFT bound still applies


def test_no_token_fails_a_ttft_bound_only() -> None:
    empty = _result(None, 0.3, 0)  # ended ok with no token
    assert tpot_s(empty) is None
    assert not Slo(ttft_ms=60_000).meets(empty)
    assert Slo(tpot_ms=1, e2e_ms=300).meets(empty)


def test_failed_requests_never_meet() -> None:
    failed = _result(0.1, 0.2, 3, (0.05, 0.05), error="UNAVAILABLE: engine failed")
    assert not Slo(e2e_ms=1e9).meets(failed)
    assert not Slo().meets(failed)
    assert Slo().meets(_result(0.1, 0.2, 3, (0.05, 0.05)))  # no bound: every ok request


def test_tpot_counts_every_token_after_the_first() -> None:
    assert tpot_s(_result(1.0, 3.0, 5)) == 0.5
    assert tpot_s(_result(1.0, 1.0, 4)) == 0.0  # every token in the first response


# --------------------------------------------------------------------------- goodput


RESULTS = [
    _result(0.5, 2.5, 5, (0.5,) * 4, rid="a"),  # TPOT 0.5 s
    _result(1.0, 2.0, 5, (0.25,) * 4, rid="b"),  # TPOT 0.25 s
    _result(0.25, 0.25, 1, rid="c"),  # one token: no TPOT
    _result(None, 3.0, 0, error="UNAVAILABLE: engine failed", rid="d"),
]


def test_goodput_counts_requests_meeting_every_bound_per_second() -> None:
    assert goodput(RESULTS, 4.0, Slo(tpot_ms=250)) == 0.5  # b and c (vacuous) over 4 s
    assert goodput(RESULTS, 4.0, Slo(tpot_ms=250, ttft_ms=500)) == 0.25  # c only
    assert goodput(RESULTS, 2.0, Slo(e2e_ms=10_000)) == 1.5  # every ok request, never the failed one
    assert goodput(RESULTS, 4.0, Slo(ttft_ms=0.001)) == 0.0  # an impossible bound
    assert goodput([], 1.0, Slo(ttft_ms=1)) == 0.0


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan")])
def test_goodput_needs_a_positive_duration(duration: float) -> None:
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        goodput(RESULTS, duration, Slo(ttft_ms=1))


def test_summarize_with_and_without_an_slo() -> None:
    slo = Slo(ttft_ms=600, tpot_ms=500)
    with_slo = summarize(RESULTS, 4.0, 4, "concurrency", 2, slo=slo)
    assert with_slo.goodput_requests_per_s == 0.5  # a and c
    assert with_slo.slo == "ttft_ms:600 tpot_ms:500"
    without = summarize(RESULTS, 4.0, 4, "concurrency", 2)
    assert without.goodput_requests_per_s is None and without.slo == ""
    assert summarize(RESULTS, 4.0, 4, "concurrency", 2, slo=Slo()) == without  # no bound: no goodput
    assert with_slo.requests_per_s == without.requests_per_s == 0.75


def test_generous_bounds_give_the_request_rate() -> None:
    s = summarize(RESULTS, 4.0, 4, "rate", 1.5, slo=Slo(ttft_ms=60_000, tpot_ms=1000))
    assert s.goodput_requests_per_s == s.requests_per_s


def test_table_shows_goodput_only_with_an_slo() -> None:
    slo = Slo(ttft_ms=600, tpot_ms=500)
    table = loadgen.format_table([summarize(RESULTS, 4.0, 4, "concurrency", k, slo=slo) for k in (1, 8)])
    title, header, row, _ = table.splitlines()
    assert title == "(concurrency; latencies in ms; goodput: ttft_ms:600 tpot_ms:500)"
    assert "goodput req/s" in header and "goodput/engine" in header
    assert row.split()[:4] == ["1", "0.75", "0.50", "0.12"]  # load, req/s, goodput, goodput / 4 engines
    plain = loadgen.format_table([summarize(RESULTS, 4.0, 4, "concurrency", 1)])
    assert "goodput" not in plain and plain.splitlines()[2].split()[:3] == ["1", "0.75", "2.8"]


# --------------------------------------------------------------------------- files


def test_json_and_csv_carry_the_goodput(tmp_path: Path) -> None:
    s = summarize(RESULTS, 4.0, 4, "rate", 2.5, slo=Slo(tpot_ms=250, itl_ms=12.5))
    write_json(tmp_path / "o.json", [s], {2.5: RESULTS}, {})
    write_csv(tmp_path / "o.csv", [s])
    assert read_json(tmp_path / "o.json")[0] == [s] == read_csv(tmp_path / "o.csv")
    assert json.loads((tmp_path / "o.json").read_text())["summaries"][0]["slo"] == "tpot_ms:250 itl_ms:12.5"


def _old(summary: Summary) -> dict[str, object]:
    """A summary as files written before goodput hold it."""
    data = summary.as_dict()
    del data["goodput_requests_per_s"], data["slo"]
    return data


def test_a_json_written_before_goodput_still_reads(tmp_path: Path) -> None:
    s = summarize(RESULTS, 4.0, 4, "concurrency", 2)
    doc = {"meta": {}, "summaries": [_old(s)], "requests": {"2": [r.as_dict() for r in RESULTS]}}
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert read_json(tmp_path / "old.json")[0] == [s]
    with pytest.raises(KeyError, match="ttft_p50_s"):  # a field that was always there is still required
        Summary.from_dict({k: v for k, v in _old(s).items() if k != "ttft_p50_s"})


def test_a_csv_written_before_goodput_still_reads(tmp_path: Path) -> None:
    s = summarize(RESULTS, 4.0, 4, "concurrency", 2)
    write_csv(tmp_path / "new.csv", [s])
    lines = (tmp_path / "new.csv").read_text().splitlines()
    old = [",".join(line.split(",")[:-2]) for line in lines]  # the two new columns are the last
    assert old[0].endswith("mean_output_tokens")
    (tmp_path / "old.csv").write_text("\n".join(old) + "\n")
    assert read_csv(tmp_path / "old.csv") == [s]


def test_the_committed_results_still_read() -> None:
    results = REPO / "benchmarks" / "results" / "seed-1024-1024"
    rows = read_csv(results / "seed-c2g2.csv")
    assert rows and all(s.goodput_requests_per_s is None and s.slo == "" for s in rows)
    report = json.loads((results / "compare.json").read_text())
    for run in report["deployments"].values():
        summaries = [Summary.from_dict(s) for s in run["summaries"]]
        assert summaries and all(s.goodput_requests_per_s is None and s.slo == "" for s in summaries)


# --------------------------------------------------------------------------- the --goodput flags


def test_bench_flag_reads_an_slo() -> None:
    args = loadgen._parser().parse_args(["--concurrency", "1", "--goodput", "ttft_ms:2000", "tpot_ms:25"])
    assert args.goodput == Slo(ttft_ms=2000, tpot_ms=25)
    assert loadgen._parser().parse_args(["--concurrency", "1"]).goodput is None


def test_compare_flag_reads_an_slo() -> None:
    args = compare._parser().parse_args(["a.yaml", "b.yaml", "--out", "o", "--goodput", "e2e_ms:5000"])
    assert args.goodput == Slo(e2e_ms=5000) and args.deployments == [Path("a.yaml"), Path("b.yaml")]
    assert compare._parser().parse_args(["a.yaml", "--out", "o"]).goodput is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "1", "--goodput", "ttft_ms:2000", "tpot:25"],
        ["--concurrency", "1", "--goodput", "tpot:25", "--count", "3"],
    ],
)
def test_bench_refuses_a_bad_item_naming_it(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        loadgen.main(argv)  # refused while parsing: no server is reached
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --goodput" in err and "'tpot:25'" in err and KEYS in err


@pytest.mark.parametrize("items", [["ttft_ms:-1"], ["ttft_ms:1", "ttft_ms:2"], []])
def test_compare_refuses_a_bad_slo(items: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        compare.main(["a.yaml", "--out", "o", "--goodput", *items])  # refused before any file is read
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --goodput" in err and (not items or repr(items[-1]) in err)
