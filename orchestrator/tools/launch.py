"""Find and start a real `tritonserver` on loopback ports.

Which tritonserver runs, and why the wheel's needs care, is `triton_install.py`.

    disagg serve [--model-repository DIR] [--http-port N] [--grpc-port N] [-- FLAGS]

As a command it also supervises the server: tritonserver runs under explicit model
control (`--load-model=*`, the whole repository) and a model whose python stub process
dies is unloaded and loaded again (`orchestrator.ops.supervisor`; `--no-supervisor` turns it off).

Every server it starts locks Triton's admin APIs (model-repository, model-config,
shared-memory, trace, logging) behind the header `admin-key` (gRPC:
`triton-grpc-protocol-admin-key`; orchestrator/ops/access.py): the key is `$DISAGG_ADMIN_KEY`,
else a random one; the command writes it to `--admin-key-file` (mode 0600, default
`.triton/admin-key`). Restricted-API flags of your own after `--` replace ours for their
protocol. The server's environment gets `DISAGG_KV_SECRET` (`$DISAGG_KV_SECRET`, else a
random one), which the stub engines sign KV handoffs with.

Once the server is ready the command also starts the OpenAI-compatible frontend
(`disagg openai`, orchestrator/frontend/) as a child on `--openai-port` (9000, loopback)
and stops it on exit; `--no-openai` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from orchestrator.ops.access import (
    ADMIN_KEY_ENV,
    GRPC_FLAG,
    HTTP_FLAG,
    KV_SECRET_ENV,
    RESTRICTED_APIS,
    check_admin_key,
    new_secret,
    required_header,
    restricting_flags,
    restriction_flags,
    write_private,
)
from orchestrator.tools.frontend_child import OpenAIFrontend
from orchestrator.tools.ports import free_port
from orchestrator.tools.supervised_run import model_control_args, run_in_foreground, run_supervised
from orchestrator.tools.triton_install import (
    Installation,
    LaunchError,
    find_installation,
    server_environment,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
# Where the command writes the admin key by default; ignored by git.
DEFAULT_ADMIN_KEY_FILE = REPO_ROOT / ".triton" / "admin-key"


@dataclass
class TritonServer:
    """A tritonserver child process on loopback; a context manager that always stops it.

    Its admin APIs are locked with `admin_key` (None: `$DISAGG_ADMIN_KEY`, else a random key
    kept for this object's life, so a restarted server keeps it); `admin_headers()` open
    them. Its stub engines sign KV handoffs with `kv_secret` (None: `$DISAGG_KV_SECRET`, else
    random): servers that hand KV to each other must be given the same one.
    """

    model_repository: Path = DEFAULT_REPOSITORY
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    extra_args: Sequence[str] = ()
    log_path: Path | None = None
    startup_timeout_s: float = 120.0
    admin_key: str | None = None
    kv_secret: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        source = "TritonServer(admin_key=...)"
        if self.admin_key is None:
            source, self.admin_key = ADMIN_KEY_ENV, os.environ.get(ADMIN_KEY_ENV) or new_secret()
        try:
            check_admin_key(self.admin_key, source)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        if self.kv_secret is None:
            self.kv_secret = os.environ.get(KV_SECRET_ENV) or new_secret()
        if not self.kv_secret.strip(", "):
            raise LaunchError(
                "TritonServer(kv_secret=...) is empty: pass a secret, or None ($DISAGG_KV_SECRET, else random)"
            )

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def admin_args(self) -> list[str]:
        """Our lock on the admin APIs, for each protocol whose lock `extra_args` do not set
        themselves (Triton refuses to start when one API is named in two flags)."""
        assert self.admin_key is not None  # set by __post_init__
        taken = restricting_flags(self.extra_args)
        return restriction_flags(self.admin_key, [f for f in (HTTP_FLAG, GRPC_FLAG) if f not in taken])

    def admin_headers(
        self, protocol: Literal["http", "grpc"] = "http", api: str = "model-repository"
    ) -> dict[str, str]:
        """The header that opens `api` over `protocol` on this server, as its flags (ours or
        the caller's) demand it; {} when that API is open. tritonclient takes it as `headers=`."""
        flag = HTTP_FLAG if protocol == "http" else GRPC_FLAG
        found = required_header([*self.admin_args(), *self.extra_args], flag, api)
        return dict([found]) if found else {}

    def environment(self, install: Installation) -> dict[str, str]:
        """`server_environment` plus the KV secret the stub engines sign handoffs with. The admin
        key stays out: no model calls the admin APIs (engines are reached by inference only)."""
        assert self.kv_secret is not None  # set by __post_init__
        env = server_environment(install)
        env[KV_SECRET_ENV] = self.kv_secret
        env.pop(ADMIN_KEY_ENV, None)
        return env

    def command(self, install: Installation) -> list[str]:
        args = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",  # no GPU here: spares NVML/DCGM errors in the log
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        if install.backend_directory is not None:
            args.append(f"--backend-directory={install.backend_directory}")
        args.extend(self.admin_args())
        args.extend(self.extra_args)
        return args

    def start(self) -> "TritonServer":
        install = find_installation()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log = open(self.log_path, "wb")
        self._log = log
        self.process = subprocess.Popen(
            self.command(install),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(install),
            start_new_session=True,  # stop() signals the whole group, stubs included
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        """Ready to serve and to be observed: tritonserver opens its metrics port ~40 ms after
        HTTP reports ready, so a caller that reads /metrics first would be refused."""
        return self._answers(f"http://{self.http_url}/v2/health/ready") and (
            not self.serves_metrics or self._answers(f"http://{self.metrics_url}/metrics")
        )

    @property
    def serves_metrics(self) -> bool:
        return "--allow-metrics=false" not in self.extra_args

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise LaunchError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise LaunchError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crash
        self._log.close()
        return proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def publish_admin_key(server: TritonServer, path: Path) -> bool:
    """Say how the admin APIs are locked, and write our key to `path` (0600) for the people
    and tools that need it. False when it could not be written and nobody else has it."""
    for flag in restricting_flags(server.extra_args):
        print(f"launcher: {flag} given after --: yours locks that protocol, ours is not added", flush=True)
    if not server.admin_args():
        print("launcher: the admin key is not written: your own flags lock every protocol", flush=True)
        return True
    assert server.admin_key is not None  # set by __post_init__
    try:
        write_private(path, server.admin_key + "\n")
    except OSError as exc:
        if os.environ.get(ADMIN_KEY_ENV):  # its owner has it already
            print(f"launcher: warning: could not write the admin key to {path} ({exc}); it is ${ADMIN_KEY_ENV}",
                  flush=True)  # fmt: skip
            return True
        print(f"error: cannot write the admin key to {path} ({exc}): "
              f"pass --admin-key-file PATH or set ${ADMIN_KEY_ENV}", file=sys.stderr, flush=True)  # fmt: skip
        return False
    print(
        f"admin APIs ({', '.join(RESTRICTED_APIS)}) need header 'admin-key' "
        f"(gRPC: 'triton-grpc-protocol-admin-key'); the key is in {path}",
        flush=True,
    )
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument(
        "--no-supervisor", action="store_true",
        help="run tritonserver alone: a dead python stub then stays dead (see README)",
    )  # fmt: skip
    parser.add_argument(
        "--restart-server-on", default="orchestrator", metavar="MODEL,...",
        help="models whose dead stub restarts the whole server (Triton strands their clients' requests)",
    )  # fmt: skip
    parser.add_argument(
        "--admin-key-file", type=Path, default=DEFAULT_ADMIN_KEY_FILE, metavar="PATH",
        help=f"where the admin key is written, mode 0600 (default: {DEFAULT_ADMIN_KEY_FILE}); "
        f"the key is ${ADMIN_KEY_ENV} if set, else a new random one",
    )  # fmt: skip
    parser.add_argument("--openai-port", type=int, default=9000,
                        help="port of the OpenAI-compatible frontend (disagg openai), on loopback")  # fmt: skip
    parser.add_argument("--no-openai", action="store_true", help="do not start the OpenAI-compatible frontend")
    parser.add_argument("extra", nargs="*", help="more tritonserver flags, after --")
    args = parser.parse_args(argv)
    extra = [*model_control_args(args.extra), *args.extra]
    try:
        server = TritonServer(
            model_repository=args.model_repository.resolve(),
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            extra_args=extra,
        )
        install = find_installation()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    supervised = not args.no_supervisor
    print(
        f"starting {install.binary} on http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}"
        + (" (supervised: dead python stubs are reloaded)" if supervised else ""),
        flush=True,
    )
    if not publish_admin_key(server, args.admin_key_file):
        return 2
    openai = None if args.no_openai else OpenAIFrontend(server, args.openai_port)
    if not supervised and openai is None:  # foreground: the server's log goes to the terminal, Ctrl-C stops it
        os.execve(str(install.binary), server.command(install), server.environment(install))
    restart = frozenset(m for m in args.restart_server_on.split(",") if m)
    with contextlib.ExitStack() as stack:
        if openai is not None:
            stack.enter_context(openai)
        if not supervised:
            return run_in_foreground(server.command(install), server.environment(install))
        return run_supervised(
            server.command(install), server.environment(install), server.http_url, restart_models=restart
        )  # fmt: skip
    return 0  # unreachable; mypy cannot tell


if __name__ == "__main__":
    sys.exit(main())
