"""The supervisor's detection and recovery logic over real processes (no Triton).

A stand-in "server" is a real Python process that starts child processes whose command
lines look like python-backend stubs (`<repo>/<model>/1/model.py ... <model>_0_0`) and,
like Triton, reaps a child only when told to stop it; a child killed behind its back stays
a zombie. The repository API is a real HTTP server on loopback that records the calls and,
like a Triton started by our launcher, can demand the admin key (403 without it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.ops.supervisor import (
    RepositoryApi,
    RestartServer,
    StubWatch,
    Supervisor,
    find_stubs,
    sibling_stub_deaths,
)

# Starts one sleeping child per model named on stdin ("start m"), prints its pid; "reap PID"
# stops and reaps one (what Triton does on unload); "exit" ends it.
_SERVER = r"""
import os, signal, subprocess, sys
repo = sys.argv[1]
children = {}
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "start":
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              f"{repo}/{arg}/1/model.py", "shm_region_x", "1048576", f"{arg}_0_0", "DEFAULT"], stdout=subprocess.DEVNULL)
        children[p.pid] = p
        print(p.pid, flush=True)
    elif cmd == "reap":
        p = children.pop(int(arg)); p.terminate(); p.wait(); print("reaped", flush=True)
    else:
        break
for p in children.values():
    p.kill()
"""

DEADLINE_S = 10.0


class FakeServer:
    def __init__(self, repo: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(repo)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, model: str) -> int:
        return int(self._say(f"start {model}"))

    def reap(self, pid: int) -> None:
        assert self._say(f"reap {pid}") == "reaped"

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=DEADLINE_S)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[FakeServer]:
    srv = FakeServer(tmp_path / "repo")
    try:
        yield srv
    finally:
        srv.close()


def _until(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
    raise AssertionError(f"not within {DEADLINE_S}s: {what}")


def test_stubs_are_found_by_their_model(server: FakeServer, tmp_path: Path) -> None:
    pids = {server.start("context_0"): "context_0", server.start("generation_10"): "generation_10"}
    stubs = _until(lambda: find_stubs(server.proc.pid) if len(find_stubs(server.proc.pid)) == 2 else None, "two stubs")
    assert {s.pid: s.model for s in stubs} == pids
    assert {s.model_file for s in stubs} == {f"{tmp_path}/repo/{m}/1/model.py" for m in pids.values()}
    assert find_stubs(os.getpid()) == []  # this test process has no stub children


def test_a_killed_stub_is_reported_dead_once(server: FakeServer) -> None:
    victim, other = server.start("orchestrator"), server.start("generation_0")
    watch = StubWatch(server.proc.pid, rescan_s=3600)
    watch.rescan()
    assert set(watch.known) == {victim, other}
    assert watch.deaths() == []
    os.kill(victim, signal.SIGKILL)  # the parent does not reap it: a zombie, as under Triton
    dead = _until(lambda: watch.deaths(wait_s=0.5), "the death is seen")
    assert [(s.pid, s.model) for s in dead] == [(victim, "orchestrator")]
    assert watch.deaths() == [] and set(watch.known) == {other}  # reported once, then forgotten
    watch.close()


def test_a_stub_reaped_by_its_server_is_not_a_death(server: FakeServer) -> None:
    """Triton reaps the stubs it stops (unload, shutdown): those are left alone."""
    pid = server.start("context_1")
    watch = StubWatch(server.proc.pid, rescan_s=3600)
    watch.rescan()
    server.reap(pid)
    _until(lambda: pid not in watch.known or watch.deaths() or pid not in watch.known, "the reaped stub is forgotten")
    assert watch.deaths() == []
    watch.close()


def test_the_sibling_view_names_the_dead_models(server: FakeServer) -> None:
    pid = server.start("generation_0")
    server.start("generation_1")
    deaths = sibling_stub_deaths(server.proc.pid)
    assert deaths() == []
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: deaths(), "the sibling's death") == ["generation_0"]


class _Repository(BaseHTTPRequestHandler):
    calls: list[str] = []
    states: dict[str, str] = {}
    key: str | None = None  # set: refuse calls without header admin-key = key, as Triton does

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.key is not None and self.headers.get("admin-key") != self.key:
            body = b'{"error":"This API is restricted, expecting header \'admin-key\'"}'
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.calls.append(self.path)
        body = b""
        if self.path == "/v2/repository/index":
            body = json.dumps([{"name": n, "state": s} for n, s in self.states.items()]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def repository() -> Iterator[type[_Repository]]:
    handler = type("Handler", (_Repository,), {"calls": [], "states": {}, "key": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_dead_model_is_unloaded_then_loaded(server: FakeServer, repository: type[_Repository]) -> None:
    repository.states.update({"orchestrator": "READY", "context_0": "UNLOADING"})
    victim = server.start("orchestrator")
    leaving = server.start("context_0")
    watch = StubWatch(server.proc.pid, rescan_s=3600)
    watch.rescan()
    messages: list[str] = []
    supervisor = Supervisor(watch, RepositoryApi(repository.url), messages.append)  # type: ignore[attr-defined]
    os.kill(victim, signal.SIGKILL)
    os.kill(leaving, signal.SIGKILL)  # its model is being unloaded: not ours to bring back
    recoveries = []
    _until(lambda: recoveries.extend(supervisor.step(0.5)) or len(watch.known) == 0, "both deaths handled")
    assert [r.model for r in recoveries] == ["orchestrator"]
    assert recoveries[0].loaded_at is not None and recoveries[0].pids == (victim,)
    assert recoveries[0].seen_dead_at <= recoveries[0].unloaded_at <= recoveries[0].loaded_at
    assert [c for c in repository.calls if c != "/v2/repository/index"] == [
        "/v2/repository/models/orchestrator/unload",
        "/v2/repository/models/orchestrator/load",
    ]
    assert any("context_0" in m and "left alone" in m for m in messages), messages
    watch.close()


def test_a_dead_stub_that_strands_clients_asks_for_a_new_server(
    server: FakeServer, repository: type[_Repository]
) -> None:
    """The orchestrator's requests come from clients, and Triton never ends them: no reload
    can help them, so the supervisor asks for a new server and touches nothing itself."""
    repository.states.update({"orchestrator": "READY", "generation_0": "READY"})
    victim = server.start("orchestrator")
    server.start("generation_0")
    watch = StubWatch(server.proc.pid, rescan_s=3600)
    watch.rescan()
    supervisor = Supervisor(watch, RepositoryApi(repository.url), restart_models=frozenset({"orchestrator"}))  # type: ignore[attr-defined]
    os.kill(victim, signal.SIGKILL)
    events = _until(lambda: supervisor.step(0.5), "the death is handled")
    assert events == [RestartServer(("orchestrator",), (victim,))]
    assert repository.calls == []
    watch.close()


def test_the_repository_api_sends_the_admin_key(repository: type[_Repository]) -> None:
    """Our servers lock the repository API: without the key the supervisor could not reload
    anything, and says why."""
    repository.key = "k" * 24
    repository.states.update({"generation_0": "READY"})
    with pytest.raises(
        RuntimeError,
        match=r"/v2/repository/index: HTTP 403: .*expecting header 'admin-key'.*give RepositoryApi the admin key",
    ):
        RepositoryApi(repository.url).states()  # type: ignore[attr-defined]
    api = RepositoryApi(repository.url, headers={"admin-key": repository.key})  # type: ignore[attr-defined]
    assert api.states() == {"generation_0": "READY"}
    api.unload("generation_0")
    api.load("generation_0")
    assert repository.calls == [
        "/v2/repository/index",
        "/v2/repository/models/generation_0/unload",
        "/v2/repository/models/generation_0/load",
    ]
