"""Injected faults: which one a request acts out.

A request's `fault` parameter names one directly; otherwise the engine's configured fault
applies to the phase it names (`fault_phase`), to a share of requests (`fault_rate`,
chosen by a hash of the request id so a retry of the same id behaves the same).
"""

from __future__ import annotations

import zlib

from orchestrator.stub_engine.config import FAULTS, EngineConfig
from orchestrator.wire.contract import EngineRequest, RequestType
from orchestrator.wire.errors import InvalidInput


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
