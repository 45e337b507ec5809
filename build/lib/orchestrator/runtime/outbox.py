"""Responses sent from a thread of their own; what queues up for one request goes out as one.

Why. In Triton 2.51's python backend every `ResponseSender.send` is a round trip to the
server process: the stub writes the response to shared memory and waits (GIL released)
until the server has taken it. Sent from a model's event loop, each send stops the loop
for that round trip; at 64 streams in flight that was half of the orchestrator loop's time
(py-spy). Here the loop only appends to a channel, and a sender thread does the round trips
while the loop goes on.

Merging. The sender takes *everything* a channel has queued at once and hands it to the
channel's `flush`, which may turn several items into one response (a request's deltas
joined). While the sender keeps up, every item goes out alone as soon as it is queued;
when it falls behind (the server is busy), a request's deltas that piled up meanwhile
become one response: fewer round trips here, and fewer responses for every hop after
(ensemble, postprocessing, the client's gRPC stream). No item ever waits for a merge: the
bigger batches appear exactly when the consumer is behind, and vanish when it catches up.

Order. A channel is flushed by one thread at a time, items in the order they were put;
channels are served in the order they became ready (round robin under load).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Generic, TypeVar

Item = TypeVar("Item")


class Channel(Generic[Item]):
    """One request's queue in an `Outbox`; `put` from any thread."""

    __slots__ = ("_outbox", "_flush", "_items", "_queued", "_busy", "_last")

    def __init__(self, outbox: "Outbox", flush: Callable[[list[Item]], None]) -> None:
        self._outbox = outbox
        self._flush = flush
        self._items: list[Item] = []
        self._queued = False  # in the outbox's ready queue
        self._busy = False  # a sender thread is flushing it now
        self._last = False  # the request's last item was put

    def put(self, item: Item, last: bool = False) -> None:
        """Queue `item`; `last`: nothing follows it. Once the last item is flushed the channel
        lets go of `flush` (usually a bound method of the request's state, which refers back
        to the channel: that cycle would keep a finished request, and its Triton request,
        alive until a full garbage collection). Items put after it are dropped."""
        self._outbox._put(self, item, last)


def _dropped(items: list[Any]) -> None:
    """A finished channel's flush."""


class Outbox:
    """Sender threads for many channels. `close()` sends what is queued, then ends them."""

    def __init__(self, name: str, threads: int = 1, log: Callable[[str], None] = lambda message: None) -> None:
        self.log = log
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[Channel[Any]] = deque()
        self._waiting = 0  # items put and not yet flushed (queued or being flushed)
        self._closing = False
        self.items = 0  # items flushed so far
        self.flushes = 0  # flush calls so far: items / flushes is the mean merge
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def channel(self, flush: Callable[[list[Item]], None]) -> Channel[Item]:
        """A channel whose queued items reach `flush`, on a sender thread, in order."""
        return Channel(self, flush)

    @property
    def queued(self) -> int:
        """Items put and not yet flushed (0 when idle: a gauge that proves nothing is stuck)."""
        return self._waiting

    def _put(self, channel: Channel[Any], item: Any, last: bool) -> None:
        with self._cond:
            closed = self._closing and not self._threads_alive()
            if not closed:
                channel._last = channel._last or last
                channel._items.append(item)
                self._waiting += 1
                if not channel._queued and not channel._busy:
                    channel._queued = True
                    self._ready.append(channel)
                    self._cond.notify()
        if closed:  # a straggler after close(): sent from the caller's thread, never lost
            channel._flush([item])

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready:
                    if self._closing:
                        return
                    cond.wait()
                channel = self._ready.popleft()
                channel._queued = False
                channel._busy = True
                items, channel._items = channel._items, []
                last = channel._last  # set with the last item's append: that item is in `items`
            try:
                channel._flush(items)
            except Exception as exc:
                self.log(f"outbox: a flush failed ({type(exc).__name__}: {exc}); its items are dropped")
            if last:
                channel._flush = _dropped
            with cond:
                channel._busy = False
                self._waiting -= len(items)
                self.items += len(items)
                self.flushes += 1
                if channel._items and not channel._queued:
                    channel._queued = True
                    self._ready.append(channel)
                    cond.notify()
                if not self._waiting:
                    cond.notify_all()  # drain() waits for this
            del channel, items  # not kept alive (with its request) while this thread waits

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything put so far is flushed; False if `timeout_s` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting, timeout_s)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Flush what is queued (at most `timeout_s`), then end the threads; returns whether all went."""
        drained = self.drain(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=1.0)
        return drained
