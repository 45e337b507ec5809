"""The threads of one load level of the load generator: a closed loop of N workers or an
open loop of Poisson arrivals, each worker with a connection of its own, then the drain.

Split from orchestrator/tools/loadgen.py (the command: `run_load`, `sweep` and the report) so
the threading, which bounds every wait and attributes every result to its request, reads on
its own. What the modes mean is in loadgen.py's docstring.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from typing import Callable

from orchestrator.bench.stats import RequestResult
from orchestrator.bench.workload import RequestSpec, Workload
from orchestrator.tools.load_connections import Connection
from orchestrator.tools.progress import Progress


class LevelRun:
    """What the threads of one load level share: the request source, results, the bounds."""

    def __init__(self, workload: Workload, salt: str, count: int, time_limit_s: float | None) -> None:
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self._specs = workload.requests(salt)
        self._count = count
        self.sent = 0
        self.done = 0
        self.errors = 0
        self.results: list[tuple[int, RequestResult]] = []
        self.started = time.monotonic()
        self.send_deadline = self.started + time_limit_s if time_limit_s else float("inf")
        self.tag = uuid.uuid4().hex[:8]

    def take(self) -> tuple[str, int, RequestSpec] | None:
        """The next request to send, or None once `count` is reached or the time is up."""
        with self.lock:
            if self.abort.is_set() or self.sent >= self._count or time.monotonic() >= self.send_deadline:
                return None
            index = self.sent
            self.sent += 1
            return f"lg-{self.tag}-{index}", index, next(self._specs)

    def record(self, index: int, result: RequestResult) -> None:
        """Keep a finished request with its index, so the report lists them in sending order."""
        with self.lock:
            self.results.append((index, result))
            self.done += 1
            self.errors += not result.ok

    def ordered(self) -> list[RequestResult]:
        """The results in sending order (workers finish out of order)."""
        with self.lock:
            return [r for _, r in sorted(self.results, key=lambda item: item[0])]


Job = tuple[str, int, RequestSpec]


def _worker(
    run: LevelRun, conn: Connection, take: Callable[[], Job | None], stream: bool, done: Callable[[], None]
) -> None:
    """Send jobs from `take` until it gives None; `done()` frees the open loop's slot."""
    try:
        while (job := take()) is not None:
            request_id, index, spec = job
            run.record(index, conn.send(request_id, spec, stream))
            done()
    finally:
        conn.close()


class LevelBar:
    """The progress bar of one load level (orchestrator/tools/progress.py): on stderr when it is a
    terminal or asked for, nothing otherwise. Only the sending thread draws it, from `run`'s
    counts, as it polls the workers (every 0.1 s) while it sends and drains."""

    def __init__(self, enabled: bool | None, label: str, total: int) -> None:
        self.bar = Progress(total, label, enabled=enabled)

    def show(self, run: LevelRun) -> None:
        if not self.bar.shown:
            return
        with run.lock:
            done, sent, errors = run.done, run.sent, run.errors
        self.bar.note(f"{errors} errors, {sent - done} in flight", refresh=False)
        self.bar.update_to(done)

    def end(self, run: LevelRun) -> None:
        self.show(run)
        self.bar.close()


def _drain(
    run: LevelRun, threads: list[threading.Thread], conns: list[Connection], timeout_s: float, progress: LevelBar
) -> None:
    """Wait for the workers; past `timeout_s` abort the open requests (they become errors)."""
    deadline = time.monotonic() + timeout_s
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        for t in threads:
            t.join(timeout=0.1)
        progress.show(run)
    if any(t.is_alive() for t in threads):
        run.abort.set()
        for conn in conns:
            conn.interrupt()
        for t in threads:
            t.join(timeout=30.0)


def _nothing() -> None:
    """A closed-loop worker has no slot to give back."""


def closed_loop(run: LevelRun, concurrency: int, make_conn: Callable[[], Connection], stream: bool,
                drain_timeout_s: float, progress: LevelBar) -> None:  # fmt: skip
    """N workers, each sending its next request when its previous one ended (at most N in flight)."""
    conns = [make_conn() for _ in range(concurrency)]
    threads = [
        threading.Thread(target=_worker, args=(run, c, run.take, stream, _nothing), daemon=True, name=f"loadgen-{i}")
        for i, c in enumerate(conns)
    ]
    for t in threads:
        t.start()
    # Sending ends by itself (count or deadline); the drain clock starts at the deadline.
    while any(t.is_alive() for t in threads) and time.monotonic() < run.send_deadline:
        time.sleep(0.1)
        progress.show(run)
    _drain(run, threads, conns, drain_timeout_s, progress)


def _sleep_until(at: float, run: LevelRun, progress: LevelBar) -> bool:
    """Sleep until the arrival time `at`; False if sending ended first."""
    while (wait := at - time.monotonic()) > 0:
        if time.monotonic() >= run.send_deadline:
            return False
        time.sleep(min(wait, 0.1))
        progress.show(run)
    return time.monotonic() < run.send_deadline


def _acquire(slots: threading.Semaphore, run: LevelRun, progress: LevelBar) -> bool:
    """A slot under the in-flight cap; False if sending ended while waiting at the cap."""
    while not slots.acquire(timeout=0.1):
        progress.show(run)
        if time.monotonic() >= run.send_deadline:
            return False
    return True


def open_loop(run: LevelRun, rate: float, seed: int, max_in_flight: int, make_conn: Callable[[], Connection],
              stream: bool, drain_timeout_s: float, progress: LevelBar) -> None:  # fmt: skip
    """Poisson arrivals; a worker per request in flight (added on demand, kept for reuse)."""
    arrivals = random.Random(f"arrivals:{seed}")
    jobs: queue.Queue[Job | None] = queue.Queue()
    slots = threading.Semaphore(max_in_flight)
    in_flight = 0
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    conns: list[Connection] = []

    def finished() -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1
        slots.release()

    next_at = time.monotonic()
    while _sleep_until(next_at, run, progress) and _acquire(slots, run, progress):
        job = run.take()
        if job is None:
            slots.release()
            break
        with lock:
            in_flight += 1
            grow = in_flight > len(threads)
        if grow:  # every queued or running job must have a worker of its own
            conn = make_conn()
            name = f"loadgen-{len(threads)}"
            args = (run, conn, jobs.get, stream, finished)
            thread = threading.Thread(target=_worker, args=args, daemon=True, name=name)
            conns.append(conn)
            threads.append(thread)
            thread.start()
        jobs.put(job)
        next_at += arrivals.expovariate(rate)
    for _ in threads:
        jobs.put(None)
    _drain(run, threads, conns, drain_timeout_s, progress)
