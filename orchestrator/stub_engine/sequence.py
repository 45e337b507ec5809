"""One request's state inside an engine (`EngineSequence`), where its outputs go (`Sink`),
and how its outputs are built. Kept apart from the scheduler (`core.py`), which owns the
policy of what runs when.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Protocol

from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_cache import Allocation
from orchestrator.stub_engine.tiny_model import SequenceKV
from orchestrator.wire.contract import EngineOutput, EngineRequest, PerfMetrics, RequestType
from orchestrator.wire.errors import InvalidInput, RequestError


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


def check_prompt(ids: tuple[int, ...], max_input_len: int, engine: str) -> None:
    """InvalidInput when an engine cannot take these prompt ids (negative ids are refused where
    tensors become a request: `orchestrator.wire.contract.token_row`)."""
    if len(ids) > max_input_len:
        raise InvalidInput(f"prompt has {len(ids)} tokens, more than engine '{engine}' max_input_len={max_input_len}")


def max_slots(request: EngineRequest) -> int:
    """KV slots the request may fill on an engine (GUARANTEED_NO_EVICT reserves them all)."""
    if request.request_type is RequestType.CONTEXT_ONLY:
        return len(request.input_ids)
    return len(request.input_ids) + request.stop.max_new_tokens


def partial_output(seq: EngineSequence) -> tuple[int, ...]:
    """What a stopped request's final output carries: nothing new when streaming or a
    context phase; the tokens so far when the client waits for one response."""
    req = seq.request
    if req.streaming or req.request_type is RequestType.CONTEXT_ONLY:
        return ()
    return tuple(seq.generated) if req.exclude_input_in_output else req.input_ids + tuple(seq.generated)


def take_token(seq: EngineSequence, token: int, now: int) -> tuple[EngineOutput | None, bool]:
    """A decoded token joins the sequence (unless it is the end token); returns the output
    to send now (a streamed delta, or the whole answer once done) and whether it is done."""
    req = seq.request
    ended = req.stop.is_end(token)
    if not ended:
        seq.generated.append(token)
        seq.tokens.append(token)
    done = ended or req.stop.finished(seq.generated) is not None
    output: EngineOutput | None = None
    if req.streaming:
        new = tuple(seq.generated[seq.sent :])
        seq.sent = len(seq.generated)
        if new or done:
            output = output_for(seq, new, now)
    elif done:
        body = tuple(seq.generated)
        if not req.exclude_input_in_output:
            body = req.input_ids + body
        output = output_for(seq, body, now)
    return output, done
