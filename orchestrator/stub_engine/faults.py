"""Injected faults: which one a request acts out, and what acting it out means.

A request's `fault` parameter names one directly; otherwise the engine's configured fault
applies to the phase it names (`fault_phase`), to a share of requests (`fault_rate`,
chosen by a hash of the request id so a retry of the same id behaves the same).

Why here and not in the scheduler: the loop and the per-sequence work only ask these
functions ("is this step slowed?", "does this request crash now?"), so the hot path
carries no fault logic and every fault's message is written once.
"""

from __future__ import annotations

import zlib
from typing import Iterable

from orchestrator.stub_engine.config import FAULTS, EngineConfig
from orchestrator.wire.contract import EngineRequest, RequestType
from orchestrator.wire.errors import ErrorCode, InvalidInput, RequestError

HELD = frozenset({"hang", "stall"})  # held at intake, never answered (only a stop or cancellation ends them)


def chosen_fault(cfg: EngineConfig, request: EngineRequest, asked: object) -> str:
    """The injected fault this request acts out ('none' when it is served normally)."""
    if asked not in (None, ""):
        if asked not in FAULTS:
            raise InvalidInput(f"request parameter 'fault'={asked!r} is unknown: use one of {list(FAULTS)}")
        return str(asked)
    if cfg.fault == "none":
        return "none"
    if cfg.fault_phase != "any":
        affected = RequestType.CONTEXT_ONLY if cfg.fault_phase == "context" else RequestType.GENERATION_ONLY
        if request.request_type is not affected:
            return "none"
    if cfg.fault_rate < 1 and zlib.crc32(request.request_id.encode()) / 2**32 >= cfg.fault_rate:
        return "none"
    return cfg.fault


def refusal(engine: str, fault: str) -> RequestError | None:
    """fault=fail: the error the request is refused with at intake (nothing queued)."""
    if fault == "fail":
        return RequestError(f"engine '{engine}' failed the request (injected fault)", ErrorCode.UNAVAILABLE)
    return None


def slow_step_s(cfg: EngineConfig, faults: Iterable[str]) -> float:
    """Extra seconds a step takes when any of its sequences acts out fault=slow."""
    return cfg.fault_delay_ms / 1e3 if any(f == "slow" for f in faults) else 0.0


def context_crash(engine: str, fault: str) -> RequestError | None:
    """fault=crash on a context phase: the error sent instead of its final response."""
    if fault == "crash":
        return RequestError(
            f"engine '{engine}' crashed before the context response (injected fault)", ErrorCode.UNAVAILABLE
        )
    return None


def stream_crash(cfg: EngineConfig, engine: str, fault: str, generated: int) -> RequestError | None:
    """fault=crash while decoding: the error that ends the stream once `fault_after_tokens` were made."""
    if fault == "crash" and generated >= cfg.fault_after_tokens:
        return RequestError(f"engine '{engine}' crashed mid-stream (injected fault)", ErrorCode.UNAVAILABLE)
    return None
