"""Bring back a python-backend model whose stub process died, with no person involved.

Why: when a stub dies (crash, OOM kill, SIGKILL), Triton 2.51 keeps the model READY and
answers every later request for it with `Stub process '<model>_0_0' is not healthy`
(HTTP 400 through the ensemble), forever; the python backend never relaunches a stub.
Triton can still unload and load the model through its repository API (explicit model
control), which starts a fresh stub. This module notices the death and does that.

How a death is seen: stubs are child processes of `tritonserver` whose command line names
`<repository>/<model>/<version>/model.py`. Triton reaps a stub only when it finalizes the
model instance itself (an unload, the server's shutdown), so a stub that exits and stays
a zombie past a short grace is one that died under Triton; a stub that vanished was reaped by Triton
(deliberately unloaded) and is left alone, and so is a model Triton no longer calls READY
(being unloaded, the server's shutdown). Deaths are awaited on pidfds
(Linux 5.3+, woken at once) where available, else by reading `/proc/<pid>/stat` per tick.

What it does, measured on Triton 2.51 (README, "When a python stub dies"): `load` of a
model that is loaded with a dead stub reloads it in place, but the dead instance keeps
taking requests until the new one is up (1.4-3 s of 400s, ready stays true); `unload`
returns in milliseconds and takes the model (and an ensemble using it) out of service at
once (ready false), then `load` brings it back. So: unload first, then load.
"""

from __future__ import annotations

import json
import os
import re
import select
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Stub:
    """One python-backend stub process: which model instance it runs."""

    pid: int
    model: str
    model_file: str


@dataclass(frozen=True, slots=True)
class RestartServer:
    """A model whose stub strands its callers' requests died: only a new server ends them.

    Triton 2.51 never answers the requests that were inside a dead decoupled stub; for an
    engine the orchestrator fails them over, but the orchestrator's own requests come from
    clients, who would wait forever. A restarted server drops their connections (a clear
    error) and refuses new ones until it is ready (retryable)."""

    models: tuple[str, ...]
    pids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Recovery:
    """One model brought back: when its stub was seen dead, unloaded, loaded (monotonic s)."""

    model: str
    pids: tuple[int, ...]
    seen_dead_at: float
    unloaded_at: float
    loaded_at: float | None  # None: every load attempt failed until the deadline
    error: str = ""

    def describe(self) -> str:
        if self.loaded_at is None:
            return f"model {self.model!r} stub {list(self.pids)} died; reload FAILED: {self.error}"
        return (
            f"model {self.model!r} stub {list(self.pids)} died; unloaded in {self.unloaded_at - self.seen_dead_at:.3f}s, "
            f"loaded again {self.loaded_at - self.seen_dead_at:.2f}s after the death was seen"
        )


def _stat(pid: int, proc: Path = PROC) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it is gone."""
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0].decode(), int(fields[1])


_INSTANCE = re.compile(r"^(.+)_\d+_\d+$")


def _model_of(cmdline: bytes) -> tuple[str, str] | None:
    """(model, model.py path) of a stub's command line, None for any other process.

    A stub's arguments hold `<repo>/<model>/<version>/model.py` and, later, its instance
    name `<model>_<group>_<index>`; the instance name decides the model, because a derived
    repository's version folder may be a link to another model's code.
    """
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    files = [a for a in args if a.endswith("/model.py") and Path(a).parent.name.isdigit()]
    if not files:
        return None
    after = args[args.index(files[0]) + 1 :]
    instances = [m.group(1) for a in after if (m := _INSTANCE.match(a))]
    return (instances[-1] if instances else Path(files[0]).parent.parent.name), files[0]


def find_stubs(server_pid: int, proc: Path = PROC) -> list[Stub]:
    """The live python-backend stubs that are children of `server_pid`."""
    stubs = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name), proc)
        if stat is None or stat[1] != server_pid or stat[0] in ("Z", "X"):
            continue
        try:
            found = _model_of((entry / "cmdline").read_bytes())
        except OSError:
            continue
        if found is not None:
            stubs.append(Stub(int(entry.name), *found))
    return stubs


@dataclass
class StubWatch:
    """Which stubs of one tritonserver died since the last look.

    `deaths(wait_s)` waits up to `wait_s` for a known stub to exit, looks for new stubs
    every `rescan_s`, and returns each stub that is still an unreaped zombie `grace_s`
    after it was first seen exited (Triton reaps the stubs it stops itself within
    milliseconds, e.g. the short-lived one it runs while loading a model).
    """

    server_pid: int
    rescan_s: float = 0.25  # a scan is ~2 ms; a stub must be seen alive once (a zombie's command line is empty)
    grace_s: float = 0.1
    proc: Path = PROC
    clock: Callable[[], float] = time.monotonic
    known: dict[int, Stub] = field(default_factory=dict)
    _fds: dict[int, int] = field(default_factory=dict)  # pid -> pidfd
    _exited: dict[int, float] = field(default_factory=dict)  # pid -> when first seen exited
    _next_scan: float = 0.0

    def rescan(self) -> None:
        for stub in find_stubs(self.server_pid, self.proc):
            if stub.pid not in self.known:
                self.known[stub.pid] = stub
                self._open_pidfd(stub.pid)
        self._next_scan = self.clock() + self.rescan_s

    def _open_pidfd(self, pid: int) -> None:
        opener = getattr(os, "pidfd_open", None)
        if opener is None or self.proc != PROC:
            return
        try:
            self._fds[pid] = opener(pid)
        except OSError:
            pass  # gone already, or no pidfd support: the per-tick stat read covers it

    def _forget(self, pid: int) -> None:
        self.known.pop(pid, None)
        self._exited.pop(pid, None)
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def deaths(self, wait_s: float = 0.0) -> list[Stub]:
        if self.clock() >= self._next_scan:
            self.rescan()
        if wait_s > 0:
            if self._fds and not self._exited:
                select.select(list(self._fds.values()), [], [], wait_s)
            else:
                time.sleep(min(wait_s, self.grace_s) if self._exited else wait_s)
        now = self.clock()
        dead = []
        for pid in list(self.known):
            stat = _stat(pid, self.proc)
            if stat is None or stat[1] != self.server_pid:
                self._forget(pid)  # reaped by Triton: unloaded on purpose, or the server's shutdown
            elif stat[0] in ("Z", "X"):
                first = self._exited.setdefault(pid, now)
                if now - first >= self.grace_s:
                    dead.append(self.known[pid])
                    self._forget(pid)
        return dead

    def close(self) -> None:
        for pid in list(self._fds):
            self._forget(pid)


class RepositoryApi:
    """Triton's model repository extension over HTTP on loopback (explicit model control).

    Our servers lock that API behind a header (orchestrator/ops/access.py): `headers` carries it,
    e.g. `{"admin-key": key}`."""

    def __init__(self, http_url: str, timeout_s: float = 300.0, headers: Mapping[str, str] | None = None) -> None:
        self.base = f"http://{http_url}"
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})

    def _post(self, path: str) -> bytes:
        request = urllib.request.Request(self.base + path, data=b"{}", method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:300]
            hint = ""
            if exc.code == 403:
                hint = " (the server locks its admin APIs: give RepositoryApi the admin key's header)"
            raise RuntimeError(f"{path}: HTTP {exc.code}: {body}{hint}") from None

    def states(self) -> dict[str, str]:
        """Each model of the repository and its state (READY, UNAVAILABLE, LOADING, ...)."""
        return {m["name"]: m.get("state", "") for m in json.loads(self._post("/v2/repository/index") or b"[]")}

    def unload(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/unload")

    def load(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/load")


class Supervisor:
    """Unload, then load, every model whose stub died; retry a failed load until `load_deadline_s`.
    A death among `restart_models` asks for a new server instead (`RestartServer`)."""

    def __init__(
        self,
        watch: StubWatch,
        repository: RepositoryApi,
        log: Callable[[str], None] = lambda message: None,
        load_deadline_s: float = 120.0,
        load_retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        restart_models: frozenset[str] = frozenset(),
    ) -> None:
        self.watch, self.repository, self.log = watch, repository, log
        self.load_deadline_s, self.load_retry_s, self.clock = load_deadline_s, load_retry_s, clock
        self.restart_models = restart_models
        self.recoveries: list[Recovery] = []

    def step(self, wait_s: float) -> list[Recovery | RestartServer]:
        """Wait up to `wait_s` for deaths; recover the models they hit (each model once)."""
        dead = self.watch.deaths(wait_s)
        if not dead:
            return []
        seen = self.clock()
        by_model: dict[str, list[int]] = {}
        for stub in dead:
            by_model.setdefault(stub.model, []).append(stub.pid)
        stranding = sorted(m for m in by_model if m in self.restart_models)
        if stranding:
            pids = tuple(pid for m in stranding for pid in by_model[m])
            self.log(f"stub(s) {pids} of {stranding} died: their clients' requests are stranded; restarting the server")
            return [RestartServer(tuple(stranding), pids)]
        return list(self.recover(by_model, seen))

    def recover(self, by_model: dict[str, list[int]], seen: float) -> list[Recovery]:
        try:
            states = self.repository.states()
        except Exception as exc:
            self.log(f"stub(s) {by_model} died but the repository API did not answer ({exc}); nothing done")
            return []
        # Only a model Triton still calls READY is served by a dead stub; one that is being
        # unloaded or is gone was taken down on purpose (or by the server's shutdown).
        models = [m for m in by_model if states.get(m) == "READY"]
        for model in set(by_model) - set(models):
            self.log(
                f"stub of model {model!r} exited while the model is {states.get(model) or 'not in the repository'}: left alone"
            )
        unloaded: dict[str, float] = {}
        for model in models:  # every unload first: the bad window ends at once for all
            try:
                self.repository.unload(model)
            except Exception as exc:
                self.log(f"unload of {model!r} failed: {exc}")
            unloaded[model] = self.clock()
        done = []
        for model in models:
            loaded_at, error = self._load(model)
            recovery = Recovery(model, tuple(by_model[model]), seen, unloaded[model], loaded_at, error)
            self.log(recovery.describe())
            self.recoveries.append(recovery)
            done.append(recovery)
        self.watch.rescan()  # the new stubs are watched from now on
        return done

    def _load(self, model: str) -> tuple[float | None, str]:
        deadline = self.clock() + self.load_deadline_s
        error = ""
        while True:
            try:
                self.repository.load(model)
                return self.clock(), ""
            except Exception as exc:
                error = str(exc)
            if self.clock() + self.load_retry_s > deadline:
                return None, error
            self.log(f"load of {model!r} failed, retrying in {self.load_retry_s:g}s: {error}")
            time.sleep(self.load_retry_s)


def supervise(
    server_pid: int,
    http_url: str,
    running: Callable[[], bool],
    log: Callable[[str], None],
    tick_s: float = 0.25,
    restart_models: frozenset[str] = frozenset(),
    headers: Mapping[str, str] | None = None,
) -> Iterable[Recovery | RestartServer]:
    """The launcher's loop: watch `server_pid`'s stubs while `running()`; yields each recovery,
    and ends after yielding a `RestartServer` (the caller replaces the server). `headers` open
    the server's repository API (its admin key)."""
    watch = StubWatch(server_pid)
    supervisor = Supervisor(watch, RepositoryApi(http_url, headers=headers), log, restart_models=restart_models)
    try:
        while running():
            for event in supervisor.step(tick_s):
                yield event
                if isinstance(event, RestartServer):
                    return
    finally:
        watch.close()


def shm_regions(server_pid: int, proc: Path = PROC) -> list[str]:
    """The python backend's shared-memory regions of `server_pid`'s stubs (an argument of each
    stub's command line): a server that is killed leaves them in /dev/shm."""
    regions = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name), proc)
        if stat is None or stat[1] != server_pid:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _model_of(b"\0".join(args)) is not None:
            regions += [a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region")]
    return regions


def sibling_stub_deaths(server_pid: int | None = None) -> Callable[[], list[str]]:
    """For a python model inside Triton (the orchestrator): a callable that returns the models
    whose stubs, its siblings under `server_pid` (default: its parent), died since the last
    call (seen at most one call late: the grace spans calls)."""
    watch = StubWatch(server_pid or os.getppid())
    return lambda: [stub.model for stub in watch.deaths()]
