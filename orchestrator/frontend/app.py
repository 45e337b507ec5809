"""The ASGI app (Starlette): OpenAI's /v1/models, /v1/completions, /v1/chat/completions,
plus /health and /metrics, in front of Triton's `ensemble`.

A request is validated (`protocol.parse_request`), sent to the ensemble as one streaming
gRPC request (always `stream=true`: a non-streaming answer is the deltas joined, so both
agree byte for byte and stop strings end generation early either way), and the first
reply is awaited before any status is sent: an ensemble error becomes a proper 4xx/5xx.
Stop strings are matched on text (`StopMatcher`); on a match, or when the client goes away
mid-stream, the ensemble gets `stop=true` with the request's id and the engines free its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from orchestrator.frontend.chat_template import ChatTemplateError, InvalidChatMessage, render_chat
from orchestrator.frontend.ensemble import EnsembleClient, Reply, RequestStream, TritonError, classify
from orchestrator.frontend.metrics import CONTENT_TYPE, FrontendMetrics, outcome_of
from orchestrator.frontend.protocol import (
    Generation,
    Kind,
    OpenAIError,
    StopMatcher,
    bad_request,
    chunk,
    finish_reason,
    full_body,
    models_body,
    now,
    parse_request,
    sse,
    usage,
)
from orchestrator.wire.errors import InvalidInput

log = logging.getLogger("disagg.frontend")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
DEFAULT_CHAT_MAX_TOKENS = 256


def render_prompt(messages: tuple[dict[str, Any], ...], tokenizer_dir: str | None) -> str:
    """Chat messages -> one prompt with the model's chat template (chat_template.py). A bad
    message is the client's (400 naming the field); a template that cannot be read or
    rendered is the deployment's (500, short)."""
    try:
        return render_chat(list(messages), tokenizer_dir)
    except InvalidChatMessage as exc:
        raise bad_request(exc.field, str(exc)) from None
    except InvalidInput as exc:  # the template's own raise_exception(...)
        raise bad_request("messages", str(exc)) from None
    except ChatTemplateError as exc:
        raise OpenAIError(500, f"the chat template of this deployment failed: {exc}", type="server_error") from None


@dataclass
class FrontendConfig:
    triton_url: str = "127.0.0.1:8001"
    model_name: str = "disagg"
    ensemble: str = "ensemble"
    tokenizer_dir: str | None = None
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    log_requests: bool = False  # one INFO line per finished request, with its id (the Triton request id)


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class SSEResponse(Response):
    """Server-sent events from an async iterator; a client disconnect cancels the iterator
    (its `finally` runs at once, not at garbage collection) and then calls `on_disconnect`."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.status_code, self.background, self.events = 200, None, events
        self.init_headers({"cache-control": "no-cache", **headers})  # no body: no content-length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
                log.warning("stream ended early: %r", pumping.exception())
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()


class Frontend:
    """The app's state: the Triton link, metrics, background stops."""

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.client = EnsembleClient(config.triton_url, config.ensemble)
        self.metrics = FrontendMetrics()
        self.created = now()
        self._background: set[asyncio.Task[Any]] = set()

    def in_background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_request(self, stream: RequestStream, request_id: str) -> None:
        """`stop=true` for an abandoned request, then read its stream to the end."""
        try:
            await self.client.stop(request_id)
            await stream.drain()
        except Exception:  # best effort; logged
            log.exception("stopping request %s failed", request_id)
        finally:
            stream.close()

    # --- endpoints ---

    async def models(self, request: Request) -> Response:
        return JSONResponse(models_body(self.config.model_name, self.created))

    async def health(self, request: Request) -> Response:
        ready = await self.client.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion", "/v1/completions")

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "chat", "/v1/chat/completions")

    async def generate(self, request: Request, kind: Kind, endpoint: str) -> Response:
        started = time.monotonic()
        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        handed_over = False
        status = 500
        rid = request.headers.get("x-request-id") or f"oai-{uuid.uuid4().hex}"
        try:
            try:
                if not _REQUEST_ID.match(rid):
                    raise bad_request(None, "header 'x-request-id' must be 1-128 characters of [A-Za-z0-9._:@/+=-]")
                try:
                    body = await request.json()
                except ValueError:
                    raise bad_request(None, "the request body is not valid JSON", code="invalid_json") from None
                gen = parse_request(
                    body, kind, served_model=self.config.model_name, default_max_tokens=self.config.default_max_tokens
                )  # fmt: skip
                prompt = gen.prompt if kind == "completion" else render_prompt(gen.messages, self.config.tokenizer_dir)
                stream = self.client.open(gen, prompt, rid)
                try:
                    first = await stream.next()
                except TritonError as exc:
                    stream.close()
                    raise classify(exc) from None
            except OpenAIError as exc:
                status = exc.status
                return error_response(exc, {"x-request-id": rid})
            headers = {"x-request-id": rid}
            if gen.stream:
                handed_over = True
                return SSEResponse(self.stream_events(gen, stream, first, rid, started, endpoint), headers)
            answer = await self.collect(gen, stream, first, rid)
            status = answer.status_code
            answer.headers.update(headers)
            return answer
        except Exception:  # never a traceback to the client
            log.exception("request failed")
            status = 500
            return error_response(OpenAIError(500, "internal error", type="server_error", code="internal_error"))
        finally:
            if not handed_over:
                gauge.dec()
                self.finished(endpoint, rid, outcome_of(status), started)

    async def texts(self, stream: RequestStream, first: Reply, rid: str, run: _Run) -> AsyncGenerator[str, None]:
        """The request's text piece by piece, stop strings cut (StopMatcher). When a stop
        string matched before the ensemble ended, the ensemble is told to stop and its last
        replies drained. `run.last` ends as the last reply (its token counts)."""
        reply = first
        while True:
            text = run.matcher.feed(reply.text)
            run.last = reply
            if text:
                yield text
            if run.matcher.stopped and not reply.final:
                await self.client.stop(rid)
                run.last = await stream.drain() or run.last
                break
            if reply.final:
                break
            reply = await stream.next()
        tail = run.matcher.flush()
        if tail:
            yield tail

    async def collect(self, gen: Generation, stream: RequestStream, first: Reply, rid: str) -> Response:
        run = _Run(StopMatcher(gen.stop), first)
        try:
            async with contextlib.aclosing(self.texts(stream, first, rid, run)) as texts:
                text = "".join([piece async for piece in texts])
        except TritonError as exc:
            return error_response(classify(exc))
        finally:
            stream.close()
        finish = finish_reason(run.matcher.stopped, run.last.num_output_tokens, gen.max_tokens)
        body = full_body(gen.kind, _response_id(gen.kind, rid), gen.model, now(), text, finish,
                         usage(first.num_input_tokens or 0, run.last.num_output_tokens or 0))  # fmt: skip
        return JSONResponse(body)

    async def stream_events(
        self, gen: Generation, stream: RequestStream, first: Reply, rid: str, started: float, endpoint: str
    ) -> AsyncIterator[bytes]:
        run = _Run(StopMatcher(gen.stop), first)
        created, cid = now(), _response_id(gen.kind, rid)
        outcome, done, sent_text = "disconnected", False, False

        def piece(text: str | None, finish: str | None = None, first: bool = False) -> bytes:
            return sse(chunk(gen.kind, cid, gen.model, created, text, finish, first=first,
                             include_usage=gen.include_usage))  # fmt: skip

        try:
            if gen.kind == "chat":
                yield piece("", first=True)
            async with contextlib.aclosing(self.texts(stream, first, rid, run)) as texts:
                async for text in texts:
                    if not sent_text:
                        sent_text = True
                        self.metrics.ttft.labels(endpoint).observe(time.monotonic() - started)
                    yield piece(text)
            yield piece(None, finish_reason(run.matcher.stopped, run.last.num_output_tokens, gen.max_tokens))
            if gen.include_usage:
                body = chunk(gen.kind, cid, gen.model, created, None, include_usage=True,
                             usage_body=usage(first.num_input_tokens or 0, run.last.num_output_tokens or 0))  # fmt: skip
                yield sse(body)
            yield sse("[DONE]")
            outcome, done = "ok", True
        except TritonError as exc:  # mid-stream: the status is sent already; an error event ends it
            error = classify(exc)
            outcome, done = outcome_of(error.status), stream.finished or exc.unreachable
            yield sse(error.body())
            yield sse("[DONE]")
        finally:
            if done or stream.finished:
                stream.close()
            else:  # the client went away (or we failed): end the request on the engines now
                self.in_background(self.stop_request(stream, rid))
            self.metrics.in_flight.labels(endpoint).dec()
            self.finished(endpoint, rid, outcome, started)

    def finished(self, endpoint: str, rid: str, outcome: str, started: float) -> None:
        """Count a finished request; with log_requests, one line naming its id (which is also
        its Triton request id, so the orchestrator's request log shows the same one)."""
        seconds = time.monotonic() - started
        self.metrics.finished(endpoint, outcome, seconds)
        if self.config.log_requests:
            log.info("request id=%s endpoint=%s outcome=%s seconds=%.3f", rid, endpoint, outcome, seconds)

    async def shutdown(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.close()


@dataclass
class _Run:
    """A request's replies as they are read: the stop-string matcher and the last reply."""

    matcher: StopMatcher
    last: Reply


def _response_id(kind: Kind, rid: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + rid


async def _catch_all(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(OpenAIError(500, "internal error", type="server_error", code="internal_error"))


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(OpenAIError(404, f"no route {request.url.path}", code="not_found"))


async def _method(request: Request, exc: Exception) -> Response:
    return error_response(OpenAIError(405, f"method {request.method} not allowed here", code="method_not_allowed"))


@contextlib.asynccontextmanager
async def _lifespan(frontend: Frontend) -> AsyncIterator[None]:
    yield
    await frontend.shutdown()


def create_app(config: FrontendConfig) -> Starlette:
    frontend = Frontend(config)
    route = Callable[[Request], Awaitable[Response]]
    routes: list[tuple[str, route, list[str]]] = [
        ("/v1/models", frontend.models, ["GET"]),
        ("/v1/completions", frontend.completions, ["POST"]),
        ("/v1/chat/completions", frontend.chat, ["POST"]),
        ("/health", frontend.health, ["GET"]),
        ("/metrics", frontend.metrics_page, ["GET"]),
    ]
    app = Starlette(
        routes=[Route(path, fn, methods=methods) for path, fn, methods in routes],
        exception_handlers={404: _not_found, 405: _method, Exception: _catch_all},
        lifespan=lambda _app: _lifespan(frontend),
    )
    app.state.frontend = frontend
    return app
