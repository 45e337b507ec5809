"""Typed request errors, one per Triton error code a client can act on.

    RequestError(code, message)      every error that ends a request
    ├── InvalidInput                 INVALID_ARG: the client must change the request
    ├── EngineUnavailable            UNAVAILABLE: an engine failed or is gone; retrying may work
    │   └── Overloaded               UNAVAILABLE, message `overloaded: ...`: a bound on queued or
    │                                in-flight work was reached; nothing failed, retry later
    ├── KVCacheGone                  NOT_FOUND: a generation engine could not fetch the context
    │                                phase's KV (lease expired or pulled, source unreachable);
    │                                the orchestrator re-runs the context phase
    ├── RequestCancelled             CANCELLED: the client cancelled it (or the server is stopping)
    ├── DuplicateRequest             ALREADY_EXISTS: a request with this id is already in flight
    └── InternalError                INTERNAL: a bug of ours; the message never carries a traceback

Library code raises these; the thin `model.py` adapters turn one into a
`pb_utils.TritonError(message, code)` on the request's single final response.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Names match `pb_utils.TritonError` attributes, so adapters map them with getattr."""

    INVALID_ARG = "INVALID_ARG"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    NOT_FOUND = "NOT_FOUND"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"


class RequestError(Exception):
    """An error that ends one request with a typed, client-readable message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidInput(RequestError, ValueError):
    code = ErrorCode.INVALID_ARG


class EngineUnavailable(RequestError):
    code = ErrorCode.UNAVAILABLE


OVERLOADED = "overloaded:"


class Overloaded(EngineUnavailable):
    """A bound on work in flight or queued is reached: answered at once instead of queueing.

    The message starts with `overloaded:` because that word is all that survives the hops
    (a gRPC stream carries only the text, `UNAVAILABLE: overloaded: ...`), and it is how the
    orchestrator tells a full engine (healthy: try another) from a failing one.
    """

    def __init__(self, why: str) -> None:
        super().__init__(f"{OVERLOADED} {why}")


def is_overloaded(error: RequestError) -> bool:
    """Whether `error` is an overload refusal, also one that came back from another process."""
    return error.code is ErrorCode.UNAVAILABLE and error.message.startswith(OVERLOADED)


class KVCacheGone(RequestError):
    code = ErrorCode.NOT_FOUND


class RequestCancelled(RequestError):
    code = ErrorCode.CANCELLED


class DuplicateRequest(RequestError):
    code = ErrorCode.ALREADY_EXISTS


class InternalError(RequestError):
    code = ErrorCode.INTERNAL


def as_request_error(exc: BaseException) -> RequestError:
    """Any exception -> a RequestError safe to show a client (no traceback, no repr dump)."""
    if isinstance(exc, RequestError):
        return exc
    return InternalError(f"internal error ({type(exc).__name__}): {exc}")
