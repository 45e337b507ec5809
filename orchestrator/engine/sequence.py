"""One request's state inside an engine (`EngineSequence`), where its outputs go (`Sink`),
and how its outputs are built. Kept apart from the scheduler (`core.py`), which owns the
policy of what runs when.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Protocol

from orchestrator.contract import EngineOutput, EngineRequest, PerfMetrics
from orchestrator.engine.handoff import Handoff
from orchestrator.engine.kv_cache import Allocation
from orchestrator.engine.tiny_model import SequenceKV
from orchestrator.errors import RequestError


class Sink(Protocol):
    """Where one request's outputs go; `final` is set on exactly one call."""

    def send(self, output: EngineOutput, final: bool) -> None: ...

    def fail(self, error: RequestError) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(slots=True, eq=False)  # identity semantics: sequences live in sets
class EngineSequence:
    """One request inside an engine: where it is, what it holds, what it has sent."""

    request: EngineRequest
    sink: Sink
    arrival_ns: int
    hashes: list[int]
    handoff: Handoff | None = None
    alloc: Allocation | None = None
    kv: SequenceKV | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + accepted tokens: what the cache holds or will
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # the token this step computed, accepted after the step's time
    sent: int = 0  # generated tokens already streamed
    pull: asyncio.Task[None] | None = None
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    kv_stats: tuple[int, int, int] = (0, 0, 0)  # new, reused, total blocks (kept after release)
    fault: str = "none"  # an injected fault this request acts out (engine config or request parameter)
    done: bool = False  # left the scheduler, blocks given back
    closed: bool = False  # its final output or error was delivered

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


def output_for(
    seq: EngineSequence, tokens: tuple[int, ...], now: int, context_phase_params: bytes | None = None
) -> EngineOutput:
    """The contract's output for `seq` now: tokens, optional handoff, perf and KV counts if asked."""
    perf = None
    if seq.request.return_perf_metrics:
        new, reused, total = seq.kv_stats
        perf = PerfMetrics(
            arrival_time_ns=seq.arrival_ns,
            first_scheduled_time_ns=seq.first_scheduled_ns,
            first_token_time_ns=seq.first_token_ns,
            last_token_time_ns=now,
            kv_cache_alloc_new_blocks=new,
            kv_cache_reused_blocks=reused,
            kv_cache_alloc_total_blocks=total,
        )
    return EngineOutput(
        tokens=tokens,
        context_phase_params=context_phase_params,
        perf=perf,
        num_input_tokens=seq.prompt_tokens,
        num_output_tokens=len(seq.generated),
    )


def join_outputs(outputs: list[EngineOutput]) -> EngineOutput:
    """Consecutive outputs of one request as one: tokens joined, the rest from the latest (its
    perf timestamps, counts and handoff); what a sender that fell behind sends at once."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    return replace(last, tokens=tuple(t for output in outputs for t in output.tokens))
