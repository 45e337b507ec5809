"""Progress bars (orchestrator/tools/progress.py): drawn on a terminal, silent elsewhere (CI
logs), and hooked into `disagg bench`, `compare` and `soak` without touching their reports."""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bench.stats import RequestResult, Summary, summarize
from orchestrator.bench.workload import LengthDist, RequestSpec, Workload
from orchestrator.tools import compare, loadgen, soak
from orchestrator.tools.progress import Progress, add_progress_flag, echo, is_terminal, progress


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_not_a_terminal_writes_nothing_but_counts() -> None:
    stream = io.StringIO()
    with progress(5, "levels", stream=stream) as bar:
        assert not bar.shown
        for _ in range(5):
            bar.update()
        bar.note("2 errors")
        bar.update_to(5)
    assert stream.getvalue() == ""
    assert bar.n == 5


def test_a_terminal_gets_a_bar_that_reaches_the_total() -> None:
    stream = FakeTerminal()
    with progress(5, "concurrency 4", stream=stream) as bar:
        assert bar.shown
        for _ in range(5):
            bar.update()
    text = stream.getvalue()
    assert bar.n == 5 and not bar.shown  # closed: later updates only count
    assert "concurrency 4" in text and "5/5" in text and "100%" in text


def test_the_flag_overrides_the_terminal_check() -> None:
    quiet, forced = FakeTerminal(), io.StringIO()
    with progress(3, "off", stream=quiet, enabled=False) as bar:
        bar.update(3)
    with progress(3, "on", stream=forced, enabled=True) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    assert "3/3" in forced.getvalue()


def test_updates_from_many_threads_all_count() -> None:
    stream = FakeTerminal()
    with progress(800, "soak", stream=stream) as bar:

        def work() -> None:
            for _ in range(100):
                bar.update()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bar.n == 800 and "800/800" in stream.getvalue()


def test_update_to_never_counts_down_and_close_is_idempotent() -> None:
    bar = Progress(10, "x", FakeTerminal())
    bar.update_to(4)
    bar.update_to(2)
    assert bar.n == 4
    bar.close()
    bar.close()
    bar.update(1)  # after close: counted, not drawn
    assert bar.n == 5


def test_echo_is_a_print_without_bars_and_steps_around_one() -> None:
    plain = io.StringIO()
    echo("== agg2 (agg2, 2 engines)", plain)
    assert plain.getvalue() == "== agg2 (agg2, 2 engines)\n"
    stream = FakeTerminal()
    with progress(2, "compare", stream=stream) as bar:
        bar.update()
        echo("a table row", stream)
        bar.update()
    text = stream.getvalue()
    assert "a table row\n" in text and text.index("a table row") < text.index("2/2")


def test_is_terminal() -> None:
    assert is_terminal(FakeTerminal())
    closed = io.StringIO()
    closed.close()  # its isatty() raises ValueError
    assert not is_terminal(closed) and not is_terminal(io.StringIO()) and not is_terminal(object())
    with open(__file__) as f:
        assert not is_terminal(f)


def test_progress_flag() -> None:
    parser = argparse.ArgumentParser()
    add_progress_flag(parser)
    assert parser.parse_args([]).progress is None
    assert parser.parse_args(["--progress"]).progress is True
    assert parser.parse_args(["--no-progress"]).progress is False


# --------------------------------------------------------------------------- the commands' hooks


class InstantConnection:
    """A loadgen connection that answers at once (no server)."""

    def send(self, request_id: str, spec: RequestSpec, stream: bool) -> RequestResult:
        now = time.monotonic()
        return RequestResult(request_id, now, 0.001, (), 0.002, spec.input_tokens, spec.max_tokens)

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


WORKLOAD = Workload(LengthDist.parse("fixed:8"), LengthDist.parse("fixed:4"), seed=1)


def _load(**options: Any) -> Summary:
    _, summary = loadgen.run_load(
        "127.0.0.1:1", WORKLOAD, count=6, time_limit_s=10, connector=lambda abort, timeout: InstantConnection(),
        **options,
    )  # fmt: skip
    return summary


@pytest.mark.parametrize("options", [{"concurrency": 2}, {"rate": 200.0}])
def test_a_load_level_draws_its_requests_only_when_asked(capsys: pytest.CaptureFixture[str], options: dict) -> None:
    assert _load(**options).ok == 6
    assert _load(progress=None, **options).ok == 6  # auto: captured stderr is no terminal
    assert capsys.readouterr().err == ""
    assert _load(progress=True, **options).ok == 6
    err = capsys.readouterr().err
    assert f"{next(iter(options))} " in err and "6/6" in err and "0 errors, 0 in flight" in err


def test_soak_counts_warmup_and_soak_in_one_bar(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fake_run_load(url: str, plans: list, *args: Any, on_outcome: Any, **kwargs: Any) -> tuple[list, list]:
        for done in range(1, len(plans) + 1):
            on_outcome(done)
        return [], []

    monkeypatch.setattr(soak, "run_load", fake_run_load)
    logged: list[str] = []
    for show in (False, True):
        report = soak.run_soak(
            requests=1000, warmup=300, url="127.0.0.1:1", log=logged.append, show_progress=show
        )  # fmt: skip
        assert report.requests_planned == 1000
    err = capsys.readouterr().err
    done_lines = [line for line in logged if "requests done" in line]
    assert [line.split()[0] for line in done_lines] == ["500", "1000"]  # only without the bar
    assert "soak" in err and "1000/1000" in err


def test_compare_stdout_is_the_same_with_bars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    (tmp_path / "agg2.yaml").write_text("name: agg2\npools: {generation: {engines: 2}}\n")

    def fake_end_to_end(d: Any, workload: Any, loads: list, *args: Any, on_level: Any, **kwargs: Any) -> list:
        summaries = [summarize([], 1.0, 2, "concurrency", k) for k in loads]
        for s in summaries:
            on_level(s)
        return summaries

    monkeypatch.setattr(compare, "end_to_end", fake_end_to_end)
    monkeypatch.setattr(compare, "plot_compare", lambda report, path: None)
    argv = [str(tmp_path / "agg2.yaml"), "--concurrency", "1,2,4", "--out", str(tmp_path / "out")]
    assert compare.main(argv) == 0
    plain = capsys.readouterr()
    assert compare.main([*argv, "--progress"]) == 0
    barred = capsys.readouterr()
    assert plain.err == "" and barred.out == plain.out
    assert "compare" in barred.err and "3/3" in barred.err and "agg2" in barred.err
