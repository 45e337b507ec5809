"""TritonServer's readiness: what a test may touch right after `start()` returns."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from scripts.launch import TritonServer


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
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
