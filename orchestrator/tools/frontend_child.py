"""The OpenAI-compatible frontend (`disagg openai`) as a child process of `disagg serve`:
started once the server is ready, stopped with the launcher."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]


class ReadyServer(Protocol):
    """What the child needs of the server: where its gRPC is, and whether it is ready."""

    @property
    def grpc_url(self) -> str: ...

    def is_ready(self) -> bool: ...


class OpenAIFrontend:
    """`disagg openai` as a child process next to a server: started once the server is ready
    (a background thread waits for it), stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, server: ReadyServer, port: int, wait_s: float = 600.0) -> None:
        self.server, self.port, self.wait_s = server, port, wait_s
        self.process: subprocess.Popen[bytes] | None = None
        self._leaving = threading.Event()
        self._thread = threading.Thread(target=self._start_when_ready, daemon=True, name="openai-frontend")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "orchestrator.frontend.server", "--triton-url", self.server.grpc_url,
                "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip

    def _start_when_ready(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self._leaving.is_set() and not self.server.is_ready():
            if time.monotonic() > deadline:
                print("launcher: the server never became ready; the OpenAI frontend is not started", flush=True)
                return
            self._leaving.wait(0.5)
        if not self._leaving.is_set():
            self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT)
            print(f"OpenAI-compatible API on http://127.0.0.1:{self.port}/v1 (disagg openai)", flush=True)

    def __enter__(self) -> "OpenAIFrontend":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._leaving.set()
        self._thread.join(timeout=5)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
