"""Where one engine's sequences are: queued, pulling KV, ready, part-way through a chunked
prefill, running, or held by a fault.

Why apart from the scheduler (`core.py`): the loop, intake and the ending of requests
(`endings.py`) all look at the same six places; one object owns them, so "every
sequence" and "forget the ended ones" are written once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from orchestrator.stub_engine.sequence import EngineSequence


@dataclass(slots=True, eq=False)
class SequenceQueues:
    """The sequences of one engine, by where they are; every sequence is in exactly one."""

    waiting: deque[EngineSequence] = field(default_factory=deque)  # queued for admission (FCFS)
    pulling: set[EngineSequence] = field(default_factory=set)  # admitted, its KV on the way
    ready: deque[EngineSequence] = field(default_factory=deque)  # KV arrived, waiting for a batch slot
    prefilling: list[EngineSequence] = field(default_factory=list)  # in the batch, prompt part-way (chunking.py)
    running: list[EngineSequence] = field(default_factory=list)  # in the batch
    stalled: list[EngineSequence] = field(default_factory=list)  # fault=stall: held, never answered

    def all(self) -> list[EngineSequence]:
        """Every sequence, wherever it is (a copy: ending them while iterating is fine)."""
        return [*self.waiting, *self.pulling, *self.ready, *self.prefilling, *self.running, *self.stalled]

    @property
    def active(self) -> int:
        """Requests not yet finished (queued, pulling, ready, prefilling, running or held)."""
        held = len(self.pulling) + len(self.ready) + len(self.prefilling) + len(self.running) + len(self.stalled)
        return len(self.waiting) + held

    def prune(self) -> None:
        """Forget ended sequences in every queue (the batch, prefilling and running, is also
        pruned each step; a pulling sequence leaves `pulling` when it ends)."""
        if any(s.done for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.done)
        if any(s.done for s in self.ready):
            self.ready = deque(s for s in self.ready if not s.done)
        self.prefilling = [s for s in self.prefilling if not s.done]
        self.running = [s for s in self.running if not s.done]
        self.stalled = [s for s in self.stalled if not s.done]

    def clear(self) -> None:
        """Forget everything queued, ready, in the batch or held (shutdown, once each has ended)."""
        self.stalled.clear()
        self.waiting.clear()
        self.ready.clear()
        self.prefilling.clear()
        self.running.clear()
