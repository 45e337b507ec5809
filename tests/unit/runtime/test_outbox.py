"""The outbox: responses leave from a sender thread; what queued for one request goes out as one.

The sender is held busy on purpose (a flush that waits for an event) so that items queue
behind it: that is the "consumer is behind" case, made deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from orchestrator.runtime.outbox import Outbox
from orchestrator.stub_engine.sequence import join_outputs
from orchestrator.text.detokenize import completion_text
from orchestrator.wire.contract import EngineOutput, parse_request
from orchestrator.wire.errors import RequestError
from tests.pipeline_harness import PROMPTS, TOK, Response, client_tensors, cluster, oracle, prompt_ids


class _Gate:
    """A channel whose flush blocks the sender thread until `open()`."""

    def __init__(self, outbox: Outbox) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.channel = outbox.channel(self._flush)

    def _flush(self, items: list[Any]) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never opened the gate"

    def hold(self) -> None:
        self.channel.put("hold")
        assert self.entered.wait(10)

    def open(self) -> None:
        self.release.set()


@pytest.fixture
def outbox() -> Any:
    box = Outbox("test-send")
    yield box
    box.close(timeout_s=5)


def test_items_queued_while_the_sender_is_busy_reach_one_flush_in_order(outbox: Outbox) -> None:
    flushes: list[list[int]] = []
    channel = outbox.channel(flushes.append)
    channel.put(0)
    assert outbox.drain(5) and flushes == [[0]]  # a sender that keeps up: each item alone
    gate = _Gate(outbox)
    gate.hold()
    for item in range(1, 6):
        channel.put(item)
    assert outbox.queued == 6  # five items and the gate's own
    gate.open()
    assert outbox.drain(5)
    assert flushes == [[0], [1, 2, 3, 4, 5]] and outbox.queued == 0
    assert (outbox.items, outbox.flushes) == (7, 3)


def test_after_its_last_item_a_channel_lets_go_of_its_flush(outbox: Outbox) -> None:
    flushed: list[str] = []
    channel = outbox.channel(flushed.extend)
    channel.put("a")
    channel.put("end", last=True)
    assert outbox.drain(5) and flushed[-1] == "end"
    channel.put("late")  # nothing follows a last item: dropped, and nothing refers to `flushed` now
    assert outbox.drain(5) and "late" not in flushed and outbox.queued == 0


def test_channels_are_served_in_the_order_they_became_ready(outbox: Outbox) -> None:
    seen: list[str] = []
    gate = _Gate(outbox)
    gate.hold()
    a = outbox.channel(lambda items: seen.extend(f"a{i}" for i in items))
    b = outbox.channel(lambda items: seen.extend(f"b{i}" for i in items))
    b.put(1)
    a.put(1)
    b.put(2)
    gate.open()
    assert outbox.drain(5) and seen == ["b1", "b2", "a1"]


def test_a_failing_flush_is_logged_and_the_sender_goes_on() -> None:
    logged: list[str] = []
    box = Outbox("test-send", log=logged.append)
    try:
        box.channel(lambda items: 1 / 0).put("x")
        done: list[str] = []
        box.channel(done.extend).put("y")
        assert box.drain(5) and done == ["y"] and box.queued == 0
        assert len(logged) == 1 and "ZeroDivisionError" in logged[0]
    finally:
        box.close()


def test_close_sends_what_is_queued_and_a_later_item_still_goes_out() -> None:
    box = Outbox("test-send", threads=2)
    flushed: list[str] = []
    gate = _Gate(box)
    gate.hold()
    channel = box.channel(flushed.extend)
    channel.put("queued")
    threading.Timer(0.05, gate.open).start()  # close() must wait for the busy sender, then flush
    assert box.close(timeout_s=5)
    assert flushed == ["queued"]
    channel.put("late")  # after close: flushed on the caller's thread, never dropped
    assert flushed == ["queued", "late"] and box.queued == 0


def test_joined_engine_outputs_keep_every_token_and_the_latest_of_the_rest() -> None:
    a = EngineOutput(tokens=(1, 2), num_input_tokens=5, num_output_tokens=2)
    b = EngineOutput(tokens=(3,), num_input_tokens=5, num_output_tokens=3)
    assert join_outputs([a]) is a
    assert join_outputs([a, b]) == EngineOutput(tokens=(1, 2, 3), num_input_tokens=5, num_output_tokens=3)


class _ThreadSafeSink:
    """The client's sink, written from the sender thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.calls, self.done = loop, [], asyncio.Event()

    def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
        self.calls.append(Response(final, tensors=tensors))
        if final:
            self.loop.call_soon_threadsafe(self.done.set)

    def fail(self, error: RequestError) -> None:
        self.calls.append(Response(True, error=error))
        self.loop.call_soon_threadsafe(self.done.set)


@pytest.mark.parametrize("prompt", ["ascii", "emoji", "cjk"])
def test_a_stream_merged_by_a_busy_sender_renders_the_unmerged_text(prompt: str) -> None:
    """The whole stream queues behind a busy sender, then goes out merged: the same bytes as
    the non-streamed completion, counts that add up, exactly one final."""
    max_tokens = 12
    tensors = client_tensors(
        PROMPTS[prompt], max_tokens, streaming=True, extra={"return_num_output_tokens": np.array([[True]])}
    )
    expected = completion_text(
        TOK, prompt_ids(tensors), asyncio.run(oracle(client_tensors(PROMPTS[prompt], max_tokens, streaming=False)))
    )

    async def main() -> list[Response]:
        c = cluster()
        c.orch.outbox = box = Outbox("test-send")
        gate = _Gate(box)
        try:
            gate.hold()
            sink = _ThreadSafeSink(asyncio.get_running_loop())
            await c.orch.start(parse_request(tensors, {}, "merged"), tensors, sink)
            assert sink.calls == [] and box.queued > 2  # all of it waits behind the gate
            gate.open()
            await asyncio.wait_for(sink.done.wait(), 10)
            assert box.drain(5) and c.orch.state()["queued_responses"] == 0
            return sink.calls
        finally:
            box.close()
            await c.orch.close()
            for core in c.cores.values():
                await core.close()

    calls = asyncio.run(main())
    assert len(calls) == 1 and calls[0].final and calls[0].error is None
    (only,) = calls
    assert only.text == expected and len(only.ids) == max_tokens
    assert int(only.tensors["num_output_tokens"].reshape(-1)[0]) == max_tokens


def test_a_finished_request_is_freed_without_waiting_for_the_garbage_collector(outbox: Outbox) -> None:
    """Progress and its channel refer to each other until the final answer is flushed; a
    cycle left behind would keep the Triton request (and its shared memory) until a full GC
    (a 3000-request soak grew the server's RSS by 97 MiB that way; 30 MiB once broken)."""
    import gc
    import weakref

    from orchestrator.serving.progress import Progress
    from orchestrator.text.detokenize import DetokWindow

    tensors = client_tensors(PROMPTS["ascii"], 4, streaming=True)
    request = parse_request(tensors, {}, "freed")
    sent: list[bool] = []

    class Sink:
        def send(self, tensors: dict[str, np.ndarray], final: bool) -> None:
            sent.append(final)

        def fail(self, error: RequestError) -> None:
            sent.append(True)

    gc.disable()
    try:
        sink = Sink()
        p = Progress(request=request, sink=sink, detok=DetokWindow(request.input_ids))
        p.outbox = outbox.channel(p.flush)
        p.generated.extend([5, 6])
        p.emit((5,), final=False)
        p.emit((6,), final=True)
        assert outbox.drain(5) and sent[-1] is True
        ref = weakref.ref(sink)  # held only through the Progress: alive as long as it is
        del p, sink
        assert ref() is None
    finally:
        gc.enable()
