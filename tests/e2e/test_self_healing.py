"""A python stub that dies is brought back by the launcher's supervisor (README: "When a
python stub dies").

The server is started the way the README starts it: `disagg serve` (what
`./scripts/serve` runs), which runs tritonserver under explicit model control with the
supervisor. Under a light streaming load through the ensemble over HTTP, a stub is
SIGKILLed; then: readiness goes false and true again, requests succeed again within 30 s,
and nothing a client sees after the death is a 400 ("you were wrong"). Triton 2.51 itself
answers 404 `has no available versions` while the model loads again (the window the README
measures). The orchestrator's stub is different: Triton strands the requests that were
inside it, so the supervisor restarts the whole server, and those clients see their
connection close; nothing may end in a client's own timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import requests

from orchestrator.ops.supervisor import find_stubs
from orchestrator.tools.launch import free_port

RECOVERY_S = 30.0  # the task's bound: requests succeed again within 30 s of the kill
READ_TIMEOUT_S = 15.0  # a client's own timeout: the only way out of a stranded request
WORDS = "the cat sat on a mat and dog ran to big red house with small blue door".split()


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    http: str
    log: Path
    key_file: Path

    @property
    def server_pid(self) -> int:
        # The launcher has two children, tritonserver and the OpenAI frontend: tell them apart
        # by what they run, not by pid order (pids wrap around on a busy machine).
        servers = [pid for pid in _children(self.proc.pid) if _is_tritonserver(pid)]
        assert len(servers) == 1, f"the launcher's tritonserver children: {servers}"
        return servers[0]

    def stub(self, model: str) -> int:
        pids = [s.pid for s in find_stubs(self.server_pid) if s.model == model]
        assert len(pids) == 1, f"{model}: stubs {pids} under server {self.server_pid}\n{self.log_tail()}"
        return pids[0]

    def log_tail(self, lines: int = 80) -> str:
        """The launcher's and tritonserver's last lines: what a failed recovery left as evidence."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no launch log: {exc})"

    def ready(self) -> bool:
        try:
            return requests.get(f"http://{self.http}/v2/health/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return False


def _is_tritonserver(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture()
def launched(tmp_path: Path) -> Iterator[Launched]:
    """A server of its own per test: a stub death may leave Triton state behind (README)."""
    log = tmp_path / "launch.log"
    key_file = tmp_path / "admin-key"  # not the checkout's .triton/admin-key
    http, grpc, metrics = free_port(), free_port(), free_port()
    out = open(log, "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "disagg"), "serve", "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), "--admin-key-file", str(key_file), "--openai-port", str(free_port())],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = Launched(proc, f"127.0.0.1:{http}", log, key_file)
    try:
        deadline = time.monotonic() + 180
        while not server.ready():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)  # the launcher passes it on: Triton's own shutdown
        try:
            proc.wait(timeout=60)  # Triton waits up to its exit timeout (30 s) for stranded requests
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind
        out.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Result:
    started: float
    ended: float = 0.0
    status: int | None = None
    text: str = ""
    error: str = ""
    timed_out: bool = False


@dataclass
class Load:
    """`clients` closed-loop clients streaming distinct prompts through the ensemble."""

    server: Launched
    clients: int = 3
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> "Load":
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=READ_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread never ended"

    def _client(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            prompt = " ".join(WORDS[(index * 7 + n * 3 + k) % len(WORDS)] for k in range(6 + n % 5))
            self.results.append(self.one(prompt + f" {index}-{n}", max_tokens=12))

    def one(self, prompt: str, max_tokens: int) -> Result:
        result = Result(time.monotonic())
        body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
        try:
            with requests.post(
                f"http://{self.server.http}/v2/models/ensemble/generate_stream",
                json=body,
                stream=True,
                timeout=(5, READ_TIMEOUT_S),
            ) as resp:
                result.status = resp.status_code
                if resp.status_code != 200:
                    result.error = resp.text
                else:
                    for line in resp.iter_lines():
                        if line.startswith(b"data: "):
                            event = json.loads(line[6:])
                            if "error" in event:
                                result.error = event["error"]
                            else:
                                result.text += event.get("text_output", "")
        except requests.exceptions.ReadTimeout:
            result.timed_out = True
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            result.error = f"connection: {exc}"  # refused while restarting, or closed mid-stream
        result.ended = time.monotonic()
        return result

    def succeeded_after(self, t: float) -> bool:
        return any(r.started > t and r.ended and r.text and not r.error for r in list(self.results))


def _acceptable_after_death(r: Result) -> bool:
    """What a client may see once a stub died: tokens, a retryable error, or Triton's own
    404 while the model loads again; never a 400-class error that blames the client."""
    if r.timed_out:
        return True  # judged separately
    if r.error.startswith("connection:"):
        return True  # refused while the server restarts, or closed mid-stream by the restart
    if r.status == 200:
        return bool(r.text) and not r.error or "UNAVAILABLE" in r.error
    if r.status == 404:
        return "has no available versions" in r.error
    return r.status == 503


def _kill_and_recover(server: Launched, model: str, load: Load) -> tuple[float, list[tuple[float, bool]]]:
    """SIGKILL `model`'s stub under `load`; returns the kill time and readiness transitions."""
    deadline = time.monotonic() + 60
    while not load.succeeded_after(0):
        assert time.monotonic() < deadline, "no request succeeded before the kill"
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(server.stub(model), signal.SIGKILL)
    transitions: list[tuple[float, bool]] = [(killed_at, True)]
    while time.monotonic() < killed_at + RECOVERY_S:
        ready = server.ready()
        if ready != transitions[-1][1]:
            transitions.append((time.monotonic(), ready))
        if len(transitions) >= 3 and load.succeeded_after(transitions[2][0]):
            break
        time.sleep(0.05)
    return killed_at, transitions


def _report(name: str, killed_at: float, transitions: list[tuple[float, bool]], load: Load) -> None:
    after = [r for r in load.results if r.ended and r.ended > killed_at and (r.error or r.timed_out or r.status != 200)]
    codes = sorted({(r.status, (r.error or "timeout")[:70]) for r in after}, key=str)
    steps = ", ".join(f"{'ready' if ok else 'not ready'} at +{t - killed_at:.2f}s" for t, ok in transitions[1:])
    first_bad = min((r.ended for r in after if not r.timed_out), default=killed_at)
    last_bad = max((r.ended for r in after if not r.timed_out), default=killed_at)
    print(
        f"\n{name}: {steps}; non-200 answers from +{first_bad - killed_at:.2f}s to +{last_bad - killed_at:.2f}s: {codes}"
    )


def _engine_successes(server: Launched, model: str) -> int:
    stats = requests.get(f"http://{server.http}/v2/models/{model}/stats", timeout=10).json()
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats["model_stats"])


def test_a_killed_engine_stub_heals_and_rejoins_its_pool(launched: Launched) -> None:
    with Load(launched) as load:
        killed_at, transitions = _kill_and_recover(launched, "generation_0", load)
        assert [ok for _, ok in transitions[:3]] == [True, False, True], f"{transitions}\n{launched.log_tail()}"
        assert load.succeeded_after(transitions[2][0])
    _report("generation_0", killed_at, transitions, load)
    after = [r for r in load.results if r.ended > killed_at]
    # The orchestrator fails over what was on the dead engine at once: nothing hangs, and a
    # client sees tokens or, where tokens had already streamed, one UNAVAILABLE.
    assert not [r for r in load.results if r.timed_out]
    assert all(
        r.status == 200 and (r.text and not r.error or r.error.startswith("in ensemble") and "UNAVAILABLE" in r.error)
        for r in after
    ), [r for r in after if r.error]
    # Back in its pool: the reloaded generation_0 serves requests again.
    before = _engine_successes(launched, "generation_0")
    probe = Load(launched, clients=0)
    deadline = time.monotonic() + RECOVERY_S
    n = 0
    while _engine_successes(launched, "generation_0") <= before:
        assert time.monotonic() < deadline, "generation_0 never served again after its reload"
        n += 1
        result = probe.one(" ".join(WORDS[(n * 5 + k) % len(WORDS)] for k in range(4 + n % 7)) + f" again {n}", 6)
        assert result.text and not result.error, result


def test_a_killed_orchestrator_stub_restarts_the_server_and_strands_nothing(launched: Launched) -> None:
    """Triton 2.51 never ends the requests inside a dead orchestrator stub: the supervisor
    replaces the whole server, so those clients get a closed connection, not a hang."""
    first_server = launched.server_pid
    with Load(launched) as load:
        killed_at, transitions = _kill_and_recover(launched, "orchestrator", load)
        assert [ok for _, ok in transitions[:3]] == [True, False, True], f"{transitions}\n{launched.log_tail()}"
        back = transitions[2][0]
        assert back - killed_at < RECOVERY_S
        assert load.succeeded_after(back)
    _report("orchestrator", killed_at, transitions, load)
    assert launched.server_pid != first_server
    # the new server keeps the admin key: the one the launcher wrote still opens its repository API
    index = f"http://{launched.http}/v2/repository/index"
    assert requests.post(index, json={}, timeout=10).status_code == 403
    assert (
        requests.post(
            index, json={}, headers={"admin-key": launched.key_file.read_text().strip()}, timeout=10
        ).status_code
        == 200
    )
    after = [r for r in load.results if r.ended > killed_at]
    bad = [r for r in after if not _acceptable_after_death(r)]
    assert not bad, bad
    assert not [r for r in load.results if r.timed_out], "a request was stranded in the dead stub"
    assert "restarting the server" in launched.log.read_text(errors="replace")
