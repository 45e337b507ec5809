"""TritonServer: readiness (what a test may touch right after `start()` returns), the admin
lock's flags and keys, and the KV secret in the server's environment."""

from __future__ import annotations

import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.ops.access import ADMIN_KEY_ENV, KV_SECRET_ENV
from orchestrator.tools.launch import Installation, LaunchError, TritonServer, publish_admin_key


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[ThreadingHTTPServer]:
    """An HTTP endpoint that answers 200 to everything, standing in for one of tritonserver's ports."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_not_ready_while_the_metrics_port_is_still_closed(listener: ThreadingHTTPServer) -> None:
    """tritonserver reports ready on HTTP ~40 ms before its metrics port opens (CI saw a
    test's first /metrics read refused); ready must cover both."""
    port = listener.server_address[1]
    with ThreadingHTTPServer(("127.0.0.1", 0), _Ok) as closed:
        free = closed.server_address[1]  # bound then closed: nothing listens there afterwards
    assert not TritonServer(http_port=port, metrics_port=free).is_ready()
    assert TritonServer(http_port=port, metrics_port=port).is_ready()
    assert TritonServer(http_port=port, metrics_port=free, extra_args=["--allow-metrics=false"]).is_ready()


# -- the admin lock and the KV secret: flags and environment ---------------------------
FAKE = Installation(binary=Path("/opt/tritonserver/bin/tritonserver"), backend_directory=None)
ADMIN_APIS = "model-repository,model-config,shared-memory,trace,logging"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No deployment secrets inherited from whoever runs the tests."""
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(KV_SECRET_ENV, raising=False)
    return monkeypatch


def test_every_server_locks_the_admin_apis_with_its_own_key(clean_env: pytest.MonkeyPatch) -> None:
    one, two = TritonServer(), TritonServer()
    assert one.admin_key and two.admin_key and one.admin_key != two.admin_key
    command = one.command(FAKE)
    assert f"--http-restricted-api={ADMIN_APIS}:admin-key={one.admin_key}" in command
    assert f"--grpc-restricted-protocol={ADMIN_APIS}:admin-key={one.admin_key}" in command
    assert one.command(FAKE) == command  # the key is the object's: a restarted server keeps it
    for open_api in ("health", "metadata", "inference", "statistics"):
        assert not any(open_api in arg for arg in command if "restricted" in arg)
    assert one.admin_headers() == {"admin-key": one.admin_key}
    assert one.admin_headers("grpc") == {"triton-grpc-protocol-admin-key": one.admin_key}


def test_keys_come_from_the_environment_or_the_caller(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ADMIN_KEY_ENV, "k" * 20)
    clean_env.setenv(KV_SECRET_ENV, "new-secret,old-secret")
    server = TritonServer()
    assert (server.admin_key, server.kv_secret) == ("k" * 20, "new-secret,old-secret")
    given = TritonServer(admin_key="a" * 16, kv_secret="shared")
    assert (given.admin_key, given.kv_secret) == ("a" * 16, "shared")


@pytest.mark.parametrize(
    "key, message",
    [("short", r"TritonServer\(admin_key=...\) is 5 characters long; use at least 16"),
     ("with a space in the key", r"characters a header cannot carry \(\[' '\]\)")],
)  # fmt: skip
def test_a_key_no_header_can_carry_is_refused(key: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        TritonServer(admin_key=key)


def test_a_bad_key_in_the_environment_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ADMIN_KEY_ENV, "abc")
    with pytest.raises(LaunchError, match=r"DISAGG_ADMIN_KEY is 3 characters long"):
        TritonServer()


def test_the_kv_secret_reaches_the_server_and_the_admin_key_does_not(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ADMIN_KEY_ENV, "k" * 20)
    one, two = TritonServer(), TritonServer(kv_secret="pinned")
    assert one.kv_secret != TritonServer().kv_secret  # random per object when nothing is given
    env = one.environment(FAKE)
    assert env[KV_SECRET_ENV] == one.kv_secret and ADMIN_KEY_ENV not in env
    assert two.environment(FAKE)[KV_SECRET_ENV] == "pinned"


def test_your_own_restricted_api_flags_replace_ours_for_their_protocol() -> None:
    """Triton refuses to start when one API is named in two flags: ours give way."""
    theirs = ["--http-restricted-api", "model-repository,model-config:x-ops=opensesame"]
    server = TritonServer(extra_args=theirs)
    command = server.command(FAKE)
    assert not [a for a in command if a.startswith("--http-restricted-api=")]
    assert [a for a in command if a.startswith("--grpc-restricted-protocol=")] == [
        f"--grpc-restricted-protocol={ADMIN_APIS}:admin-key={server.admin_key}"
    ]
    assert server.admin_headers("http") == {"x-ops": "opensesame"}
    assert server.admin_headers("http", api="logging") == {}  # they left it open
    both = TritonServer(extra_args=[*theirs, "--grpc-restricted-protocol=trace:x-ops=opensesame"])
    assert both.admin_args() == [] and both.admin_headers("grpc", api="trace") == {
        "triton-grpc-protocol-x-ops": "opensesame"
    }


def test_the_launcher_writes_the_key_for_its_owner_only(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys" / "admin-key"
    path.parent.mkdir()
    path.write_text("an older key\n")
    path.chmod(0o644)
    server = TritonServer()
    assert publish_admin_key(server, path)
    assert path.read_text() == f"{server.admin_key}\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"the key is in {path}" in capsys.readouterr().out
    theirs = TritonServer(extra_args=["--http-restricted-api=logging:a=b", "--grpc-restricted-protocol=logging:a=b"])
    assert publish_admin_key(theirs, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    out = capsys.readouterr().out
    assert "--http-restricted-api given after --" in out and "not written" in out


def test_an_unwritable_key_file_stops_the_launcher_unless_the_key_is_known(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not publish_admin_key(TritonServer(), blocker / "admin-key")  # a folder that is a file
    assert "pass --admin-key-file PATH or set $DISAGG_ADMIN_KEY" in capsys.readouterr().err
    clean_env.setenv(ADMIN_KEY_ENV, "k" * 20)
    assert publish_admin_key(TritonServer(), blocker / "admin-key")
    assert "warning: could not write the admin key" in capsys.readouterr().out
