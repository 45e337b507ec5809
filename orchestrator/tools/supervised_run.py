"""tritonserver as the launcher's child: supervised (dead python stubs brought back, the
whole server replaced when the orchestrator's stub dies) or plain, with signals passed on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from orchestrator.ops.access import HTTP_FLAG, required_header


def model_control_args(extra: Sequence[str]) -> list[str]:
    """Explicit model control that loads the whole repository, unless the flags choose a mode:
    the supervisor brings a model back through the repository API, which needs it."""
    if any(arg.startswith("--model-control-mode") for arg in extra):
        return []
    return ["--model-control-mode=explicit", "--load-model=*"]


def _kill_with_its_shm(proc: subprocess.Popen[bytes], regions: list[str]) -> float:
    """SIGKILL a server and remove its stubs' shared memory; returns the seconds it took."""
    started = time.monotonic()
    proc.kill()
    proc.wait()
    for region in regions:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{region}")
    return time.monotonic() - started


def run_supervised(
    command: list[str], env: dict[str, str], http_url: str, tick_s: float = 0.25,
    restart_models: frozenset[str] = frozenset({"orchestrator"}),
) -> int:  # fmt: skip
    """Run tritonserver as a child and bring back any model whose python stub dies, until it exits.

    A dead stub of `restart_models` strands its clients' requests (Triton 2.51 never ends
    them), so then the whole server is replaced: SIGKILL (a graceful shutdown would wait
    its exit timeout for the stranded requests), its stubs' shared memory removed (the
    stubs end themselves when their server is gone), the same command started again.
    SIGINT/SIGTERM to this process go on to the server (its graceful shutdown); the exit code
    is the server's. The repository API is called with the header that `command`'s
    restricted-API flags demand (the admin key). The logic is `orchestrator.ops.supervisor`;
    this is only its loop.
    """
    from orchestrator.ops.supervisor import RestartServer, shm_regions, supervise

    current: list[subprocess.Popen[bytes]] = []
    stopping = False
    needed = required_header(command, HTTP_FLAG)
    headers = dict([needed]) if needed else {}

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(ProcessLookupError):
            current[-1].send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)

    def log(message: str) -> None:
        print(f"supervisor {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)

    while True:
        proc = subprocess.Popen(command, env=env)
        current.append(proc)
        restart = False
        try:

            def running(proc: subprocess.Popen[bytes] = proc) -> bool:
                return proc.poll() is None and not stopping

            for event in supervise(proc.pid, http_url, running, log, tick_s, restart_models, headers):
                restart = isinstance(event, RestartServer)
        finally:
            if not restart and not stopping:  # the supervisor failed: take the server down with it
                with contextlib.suppress(ProcessLookupError):
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
        if not restart or stopping:
            code = proc.wait()
            return code if code >= 0 else 128 - code
        log(f"server stopped in {_kill_with_its_shm(proc, shm_regions(proc.pid)):.1f}s; starting it again")


def run_in_foreground(command: list[str], env: dict[str, str]) -> int:
    """tritonserver as a child (not exec'd: the frontend child must be stopped after it)."""
    proc = subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = proc.wait()
    return code if code >= 0 else 128 - code
