"""The CI soak: ~1000 mixed requests with stops and injected engine faults through a real
tritonserver (orchestrator/tools/soak.py), then every check of the soak must hold. The small tests
below it show that those checks do fail on what they look for, without a server."""

from __future__ import annotations

import http.server
import threading
from typing import Iterator

import pytest

from orchestrator.tools.soak import run_soak
from orchestrator.tools.soak_checks import Outcome, check_outcomes, expected_gauges, references, wait_gauges_zero
from orchestrator.tools.soak_plan import Plan


@pytest.mark.timeout(300)
def test_soak_of_1000_requests_with_stops_and_faults_keeps_every_promise() -> None:
    """The repository as served: engines by BLS, streaming generations over loopback gRPC
    (README "The BLS stub crash": with those over BLS too, this soak deadlocked the
    orchestrator's stub in each of 3 runs)."""
    report = run_soak(requests=1000, concurrency=48, time_limit_s=150, seed=1, request_timeout_s=30)
    print(report.summary())
    assert not report.failures, report.summary()
    assert report.requests_sent == report.requests_planned, "the time limit cut the CI soak short"
    assert report.outcomes.get("stopped", 0) >= 10, f"too few requests were cut short by a stop: {report.outcomes}"
    # generation_0's crashes after streamed tokens are migrated: they end ok (their text is
    # checked against the other completions of the same inputs), counted by the orchestrator
    assert report.migrations is not None and report.migrations.get("ok", 0) >= 3, (
        f"too few migrations: {report.migrations}"
    )
    assert report.outcomes.get("ok", 0) >= 800, report.outcomes
    assert report.leak_wait_s.keys() == {"warmup", "end"} and report.rss_growth_mib is not None


# -- the checks themselves ----------------------------------------------------------------


def _outcome(rid: str, kind: str, text: str = "abc", *, stream: bool = True, stop: str = "", problems: tuple[str, ...] = (),
             message: str = "", code: str = "") -> Outcome:  # fmt: skip
    plan = Plan(rid, "the cat sat on the mat", 8, stream, (), 0.1 if stop else None)
    return Outcome(plan, kind, code, message, text, 0.1, stop, problems)


def test_outcome_checks_flag_hangs_bad_errors_extra_responses_and_divergent_text() -> None:
    outcomes = [
        _outcome("a", "ok", "the dog"),
        _outcome("b", "ok", "the dog", stream=False),
        _outcome("c", "hung", ""),
        _outcome(
            "d",
            "error",
            "",
            message="in ensemble 'ensemble', INTERNAL: Traceback (most recent call last)",
            code="INTERNAL",
        ),
        _outcome("e", "ok", "the dog", problems=("after its final: a response for 'e'",)),
        _outcome("f", "ok", "the cow"),
        _outcome("g", "ok", "the", stop="before_final"),  # a stop cut it: a prefix is fine
        _outcome("h", "ok", "thx", stop="before_final"),  # ... anything else is not
    ]
    failures = " | ".join(check_outcomes(outcomes, references(outcomes)))
    for expected in ("1 requests without a final response (hung): c", "unexpected error kinds: d",
                     "with a traceback: d", "broken response promises: e", "differ from another of the same inputs: f",
                     "not a prefix of the completion: h"):  # fmt: skip
        assert expected in failures, failures
    assert "g (" not in failures


def test_a_mid_stream_failure_that_was_not_migrated_fails_a_migrating_soak() -> None:
    message = "in ensemble 'ensemble', UNAVAILABLE: generation phase failed on engine 'generation_0': crashed"
    outcomes = [
        _outcome("a", "ok", "the dog"),
        _outcome("b", "error", "the", message=message + " (after tokens were streamed: not retried)", code="UNAVAILABLE"),
        _outcome("c", "error", "", message=message + " (after tokens were streamed: migration 1 of max_migrations=1 "
                 "failed: no generation engine is available)", code="UNAVAILABLE"),
    ]  # fmt: skip
    assert check_outcomes(outcomes, references(outcomes)) == []
    (failure,) = check_outcomes(outcomes, references(outcomes), migrating=True)
    assert failure.startswith("1 mid-stream failures that were not migrated: b:"), failure


def test_clean_outcomes_pass() -> None:
    outcomes = [
        _outcome("a", "ok", "the dog"),
        _outcome("b", "ok", "the dog", stream=False),
        _outcome("c", "ok", "", stop="before_final"),
        _outcome("d", "error", "the", message="in ensemble 'ensemble', UNAVAILABLE: crashed", code="UNAVAILABLE"),
    ]
    assert check_outcomes(outcomes, references(outcomes)) == []


@pytest.fixture
def metrics_endpoint() -> Iterator[tuple[str, list[str]]]:
    """A loopback Prometheus endpoint serving whatever text the test puts in the list."""
    body = [""]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body[0].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", body
    finally:
        server.shutdown()


def _page(values: dict[str, float]) -> str:
    return "".join(
        f'{key.split("{")[0]}{{model="{key.split("{")[1][:-1]}"}} {value}\n' for key, value in values.items()
    )


def test_leak_check_reports_a_gauge_that_stays_non_zero_and_one_that_is_missing(
    metrics_endpoint: tuple[str, list[str]],
) -> None:
    url, body = metrics_endpoint
    expected = expected_gauges(["context_0"])
    values = dict.fromkeys(expected, 0.0)
    values["disagg_engine_leases{context_0}"] = 2.0
    del values["disagg_orchestrator_stops_pending{orchestrator}"]
    body[0] = _page(values) + 'disagg_engine_kv_blocks_free{model="context_0"} 1024\n'  # capacity: never 0
    _, bad = wait_gauges_zero(url, expected, deadline_s=0.5)
    assert bad.keys() == {"disagg_engine_leases{context_0}", "disagg_orchestrator_stops_pending{orchestrator}"}
    body[0] = _page(dict.fromkeys(expected, 0.0)) + 'disagg_engine_kv_blocks_free{model="context_0"} 1024\n'
    waited, bad = wait_gauges_zero(url, expected, deadline_s=5.0)
    assert bad == {} and waited < 2.0
