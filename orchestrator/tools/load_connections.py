"""How one request is sent and timed over gRPC streaming or HTTP `generate_stream`, for
the load generator (`orchestrator/tools/loadgen.py` keeps the command and the report, `load_loops.py` the loops).

A `Connection` carries one request at a time: a gRPC stream (its errors carry no request
id, so one request per stream is what lets an error be attributed) or an HTTP session on
`generate_stream` (server-sent events). Each response is time-stamped as it arrives; a
request still open at its timeout or on abort is stopped (`stop=true`) and is an error.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from typing import Any, Callable, Protocol

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.bench.stats import RequestResult
from orchestrator.bench.workload import RequestSpec
from orchestrator.tools.client import ensemble_inputs

PROTOCOLS = ("grpc", "http")


def _hostport(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


class _Unfinished(Exception):
    """The request was still open at its timeout or when the run was aborted."""


class Connection(Protocol):
    """One worker's link to the server, carrying one request at a time."""

    def send(self, request_id: str, spec: RequestSpec, stream: bool) -> RequestResult: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return exc.message() or str(exc)
    return f"{type(exc).__name__}: {exc}"


class _Attempt:
    """One request's responses as they arrive, turned into a `RequestResult` at its end.

    Tokens per response come from the server's cumulative `num_output_tokens` (the
    difference to the previous response); a server that does not send it is counted as
    one token per non-empty text delta.
    """

    def __init__(self, request_id: str, spec: RequestSpec, timeout_s: float) -> None:
        self.request_id, self.spec, self.timeout_s = request_id, spec, timeout_s
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self._events: list[tuple[float, int]] = []
        self._tokens = 0

    def response(self, arrived: float, cumulative: int | None, text: str) -> None:
        carried = (1 if text else 0) if cumulative is None else max(0, cumulative - self._tokens)
        self._tokens += carried
        self._events.append((arrived, carried))

    def result(self, end: float | None = None, error: str = "") -> RequestResult:
        end = time.monotonic() if end is None else end
        return RequestResult.from_responses(
            self.request_id, self.start, self._events, end, self.spec.input_tokens, error
        )  # fmt: skip

    def unfinished(self, aborted: bool) -> RequestResult:
        if aborted:
            return self.result(error="unfinished: still open when the drain timeout ended the run")
        return self.result(error=f"unfinished: no final response within {self.timeout_s:g}s")


def _run_gated(fn: Callable[[], object], timeout_s: float) -> bool:
    """Run `fn` in a daemon thread and wait at most `timeout_s` (tritonclient's stream close
    waits for the server to end the stream, which a stuck request can delay forever)."""
    done = threading.Event()

    def call() -> None:
        with contextlib.suppress(Exception):
            fn()
        done.set()

    threading.Thread(target=call, daemon=True, name="loadgen-close").start()
    return done.wait(timeout_s)


def _num_output_tokens(result: Any) -> int | None:
    arr = result.as_numpy("num_output_tokens")
    return None if arr is None else int(arr.reshape(-1)[0])


def _text(result: Any) -> str:
    arr = result.as_numpy("text_output")
    return "" if arr is None else b"".join(arr.reshape(-1)).decode("utf-8", errors="replace")


class GrpcConnection:
    """A tritonclient gRPC stream; responses are time-stamped in tritonclient's reader thread."""

    def __init__(self, url: str, model: str, abort: threading.Event, request_timeout_s: float) -> None:
        self._url, self._model, self._abort, self._timeout_s = _hostport(url), model, abort, request_timeout_s
        self._open()

    def _open(self) -> None:
        self._replies: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
        self._client = grpcclient.InferenceServerClient(self._url)
        replies = self._replies
        self._client.start_stream(callback=lambda result, error: replies.put((time.monotonic(), result, error)))

    def send(self, request_id: str, spec: RequestSpec, stream: bool) -> RequestResult:
        inputs = ensemble_inputs(
            spec.prompt, spec.max_tokens, stream=stream, end_id=-1,
            return_num_output_tokens=True, exclude_input_in_output=True,
        )  # fmt: skip
        attempt = _Attempt(request_id, spec, self._timeout_s)
        try:
            self._client.async_stream_infer(
                self._model, inputs, request_id=request_id, enable_empty_final_response=True
            )  # fmt: skip
            while True:
                if self._abort.is_set() or time.monotonic() >= attempt.deadline:
                    raise _Unfinished()
                try:
                    arrived, result, error = self._replies.get(timeout=0.05)
                except queue.Empty:
                    continue
                if error is not None:
                    self._reopen()  # the error may have ended the stream itself (a gRPC error)
                    return attempt.result(arrived, _error_text(error))
                response = result.get_response()
                if response.id != request_id:
                    continue  # a late reply of an earlier request on this stream
                attempt.response(arrived, _num_output_tokens(result), _text(result))
                if response.parameters["triton_final_response"].bool_param:
                    return attempt.result(arrived)
        except _Unfinished:
            with contextlib.suppress(Exception):  # the ensemble does not pass a cancellation on: stop it
                self._client.async_stream_infer(self._model, ensemble_inputs("", 1, stop=True), request_id=request_id)
            time.sleep(0.2)  # let the stop reach the server before the stream is cancelled
            self._reopen()
            return attempt.unfinished(self._abort.is_set())
        except InferenceServerException as exc:  # the stream was already broken (server gone, say)
            cause = self._stream_error()
            self._reopen()
            return attempt.result(error=_error_text(cause or exc))

    def _stream_error(self) -> BaseException | None:
        """The error that broke the stream: tritonclient hands it to the callback and then
        refuses every send with a generic message."""
        while True:
            try:
                _, result, error = self._replies.get_nowait()
            except queue.Empty:
                return None
            if result is None and error is not None:
                return error

    def _reopen(self) -> None:
        """Drop this stream (it may still owe replies, or be dead) and start a fresh one."""
        client = self._client
        _run_gated(lambda: (client.stop_stream(cancel_requests=True), client.close()), 10.0)
        if not self._abort.is_set():
            self._open()

    def interrupt(self) -> None:
        """Nothing to do: `send` polls the abort flag."""

    def close(self) -> None:
        client = self._client
        _run_gated(lambda: (client.stop_stream(cancel_requests=False), client.close()), 10.0)


class HttpConnection:
    """`generate_stream` over one `requests` session; each `data:` event is one response."""

    def __init__(self, url: str, model: str, abort: threading.Event, request_timeout_s: float) -> None:
        import requests

        self._requests = requests
        base = (url if "://" in url else f"http://{url}").rstrip("/")
        self._url = f"{base}/v2/models/{model}"
        self._abort, self._timeout_s = abort, request_timeout_s
        self._session = requests.Session()
        self._response: Any = None

    def send(self, request_id: str, spec: RequestSpec, stream: bool) -> RequestResult:
        body: dict[str, Any] = {
            "id": request_id, "text_input": spec.prompt, "max_tokens": spec.max_tokens, "stream": stream,
            "end_id": -1, "return_num_output_tokens": True, "exclude_input_in_output": True,
        }  # fmt: skip
        attempt = _Attempt(request_id, spec, self._timeout_s)
        timeout = (10.0, self._timeout_s)  # connect, and the longest silence between bytes
        try:
            with self._session.post(f"{self._url}/generate_stream", json=body, stream=True, timeout=timeout) as resp:
                self._response = resp
                if resp.status_code != 200:
                    return attempt.result(error=_http_error(resp.text, resp.status_code))
                for line in resp.iter_lines():
                    arrived = time.monotonic()
                    if arrived >= attempt.deadline:
                        raise _Unfinished()
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        return attempt.result(arrived, str(event["error"]))
                    tokens = event.get("num_output_tokens")
                    attempt.response(arrived, None if tokens is None else int(tokens), event.get("text_output", ""))
            return attempt.result()  # the server ends the event stream after the final response
        except Exception as exc:
            if self._abort.is_set() or isinstance(exc, (_Unfinished, self._requests.Timeout)):
                self._stop(request_id)
                return attempt.unfinished(self._abort.is_set())
            return attempt.result(error=_error_text(exc))
        finally:
            self._response = None

    def _stop(self, request_id: str) -> None:
        body: dict[str, Any] = {"id": request_id, "text_input": "", "max_tokens": 1, "stop": True}
        with contextlib.suppress(Exception):
            self._requests.post(f"{self._url}/generate", json=body, timeout=5.0)

    def interrupt(self) -> None:
        """Close the open response so a read blocked on it returns."""
        resp = self._response
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.close()

    def close(self) -> None:
        self._session.close()


def _http_error(text: str, status: int) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(text)["error"])
    return f"HTTP {status}: {text[:200]}"


def connect(protocol: str, url: str, model: str, abort: threading.Event, request_timeout_s: float) -> Connection:
    if protocol == "grpc":
        return GrpcConnection(url, model, abort, request_timeout_s)
    if protocol == "http":
        return HttpConnection(url, model, abort, request_timeout_s)
    raise ValueError(f"protocol {protocol!r} is unknown: use one of {list(PROTOCOLS)}")
