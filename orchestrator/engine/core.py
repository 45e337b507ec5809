"""The stub engine core: one in-flight batching loop per engine model.

Each step takes one decode token from every running sequence plus as many queued
prompts as fit (`max_batch_size` sequences, `max_num_tokens` tokens), sleeps for the cost
model's time of that step (the stand-in for GPU time), then emits the step's tokens.
New requests join between steps and finished ones leave, so one engine serves many
requests at once and a long prefill in a step delays every running sequence's next
token, as on a GPU.

Phases (the `request_type` parameter):
- context_only: prefill, emit the first token and a `Handoff` blob in one final output;
- generation_only: import the handoff's state, re-emit its first token, then decode;
- aggregate: prefill and decode here.

Outputs go to a `Sink` per request (the Triton adapter wraps a response sender); every
submitted request gets exactly one final output or one error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from orchestrator.contract import EngineOutput, EngineRequest, PerfMetrics, RequestType
from orchestrator.engine.config import EngineConfig
from orchestrator.engine.handoff import Handoff
from orchestrator.engine.tiny_model import InductionModel, SequenceState
from orchestrator.errors import InvalidInput, RequestError, as_request_error


class Sink(Protocol):
    """Where one request's outputs go; `final` is set on exactly one call."""

    def send(self, output: EngineOutput, final: bool) -> None: ...

    def fail(self, error: RequestError) -> None: ...


@dataclass(slots=True)
class _Sequence:
    request: EngineRequest
    sink: Sink
    arrival_ns: int
    state: SequenceState | None = None
    handoff: Handoff | None = None
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # generated tokens already streamed
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    done: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


class EngineCore:
    """Scheduler state and loop for one engine; all methods run on one asyncio loop."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        model: InductionModel | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.name = name
        self.config = config
        self.model = model or InductionModel()
        self._clock_ns = clock_ns
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    # -- intake ---------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Queue a request; raises InvalidInput (nothing queued) when it cannot be served."""
        if len(request.input_ids) > self.config.max_input_len:
            raise InvalidInput(
                f"prompt has {len(request.input_ids)} tokens, more than engine '{self.name}' "
                f"max_input_len={self.config.max_input_len}"
            )
        seq = _Sequence(request=request, sink=sink, arrival_ns=self._clock_ns())
        if request.request_type is RequestType.GENERATION_ONLY:
            seq.handoff = self._accept_handoff(request)
        self._waiting.append(seq)
        self._ensure_loop()
        self._wakeup.set()

    def _accept_handoff(self, request: EngineRequest) -> Handoff:
        if request.context_phase_params is None:
            raise InvalidInput("a generation_only request needs the context_phase_params of its context phase")
        try:
            handoff = Handoff.decode(request.context_phase_params)
            state = self.model.import_state(handoff.state)
        except ValueError as exc:
            message = str(exc)
            if "context_phase_params" not in message:
                message = f"context_phase_params holds an unusable model state: {message}"
            raise InvalidInput(message) from None
        if tuple(state.tokens) != request.input_ids:
            raise InvalidInput("context_phase_params belong to a different prompt than this request's input_ids")
        return handoff

    @property
    def active(self) -> int:
        return len(self._waiting) + len(self._running)

    # -- loop -----------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.name}")

    async def _loop(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
            decoding = list(self._running)  # before admission: a new sequence's first step is its prefill
            admitted = self._admit()
            prefill_tokens = sum(s.prompt_tokens for s in admitted if s.handoff is None)
            self.steps += 1
            await asyncio.sleep(self.config.step_seconds(prefill_tokens, len(decoding)))
            now = self._clock_ns()
            for seq in admitted:
                self._guarded(seq, self._start, seq, now)
            for seq in decoding:
                self._guarded(seq, self._decode, seq, now)
            self._running = [s for s in self._running if not s.done]

    def _admit(self) -> list[_Sequence]:
        """Move queued sequences into this step while the batch and token budget allow."""
        admitted: list[_Sequence] = []
        budget = self.config.max_num_tokens - len(self._running)
        now = self._clock_ns()
        while self._waiting and len(self._running) + len(admitted) < self.config.max_batch_size:
            seq = self._waiting[0]
            cost = 1 if seq.handoff is not None else seq.prompt_tokens
            never_fits = cost > self.config.max_num_tokens
            if cost > budget and (admitted or not never_fits):
                break  # wait for room; a prompt that can never fit runs as its step's only prefill
            self._waiting.popleft()
            budget -= cost
            seq.first_scheduled_ns = now
            admitted.append(seq)
        self._running.extend(admitted)
        return admitted

    def _guarded(self, seq: _Sequence, fn: Callable[..., None], *args: object) -> None:
        """Run one sequence's work; a failure ends that sequence only, with a typed error."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - becomes this request's error response
            self._finish(seq)
            try:
                seq.sink.fail(as_request_error(exc))
            except Exception:  # noqa: BLE001 - its client is gone; the loop must go on for the others
                pass

    # -- per-sequence work ----------------------------------------------------------
    def _start(self, seq: _Sequence, now: int) -> None:
        req = seq.request
        if seq.handoff is not None:
            seq.state = self.model.import_state(seq.handoff.state)
            first = seq.handoff.first_token
        else:
            seq.state = self.model.prefill(req.input_ids, req.sampling.key())
            first = self.model.next_token(seq.state)
        seq.first_token_ns = now
        if req.request_type is RequestType.CONTEXT_ONLY:
            self._finish_context(seq, first, now)
            return
        self._accept_token(seq, first, now)

    def _finish_context(self, seq: _Sequence, first: int, now: int) -> None:
        """A context-only request ends here: one final output with the first token and the handoff."""
        req = seq.request
        assert seq.state is not None
        ended = req.stop.is_end(first)
        tokens = () if ended else (first,)
        done = ended or req.stop.finished(tokens) is not None
        blob = None
        if not done:
            blob = Handoff(req.request_id, self.name, first, self.model.export_state(seq.state)).encode()
        self._finish(seq)
        seq.sink.send(self._output(seq, tokens, now, context_phase_params=blob), final=True)

    def _decode(self, seq: _Sequence, now: int) -> None:
        if seq.done:
            return  # ended earlier in this step
        assert seq.state is not None
        self._accept_token(seq, self.model.next_token(seq.state), now)

    def _accept_token(self, seq: _Sequence, token: int, now: int) -> None:
        req = seq.request
        assert seq.state is not None
        ended = req.stop.is_end(token)
        if not ended:
            seq.generated.append(token)
            seq.state.append(token)
        done = ended or req.stop.finished(seq.generated) is not None
        if done:
            self._finish(seq)
        if req.streaming:
            new = tuple(seq.generated[seq.sent :])
            seq.sent = len(seq.generated)
            if new or done:
                seq.sink.send(self._output(seq, new, now), final=done)
        elif done:
            body = tuple(seq.generated)
            if not req.exclude_input_in_output:
                body = req.input_ids + body
            seq.sink.send(self._output(seq, body, now), final=True)

    def _finish(self, seq: _Sequence) -> None:
        seq.done = True  # the loop drops it from the running batch at the end of the step

    def _output(self, seq: _Sequence, tokens: tuple[int, ...], now: int, context_phase_params: bytes | None = None) -> EngineOutput:
        perf = None
        if seq.request.return_perf_metrics:
            perf = PerfMetrics(
                arrival_time_ns=seq.arrival_ns,
                first_scheduled_time_ns=seq.first_scheduled_ns,
                first_token_time_ns=seq.first_token_ns,
                last_token_time_ns=now,
            )
        return EngineOutput(
            tokens=tokens,
            context_phase_params=context_phase_params,
            perf=perf,
            num_input_tokens=seq.prompt_tokens,
            num_output_tokens=len(seq.generated),
        )
