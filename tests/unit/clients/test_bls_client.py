"""BlsEngineClient against a stand-in for Triton's `pb_utils` BLS surface (which exists only
inside the python backend stub): tests/fake_pb_utils.py, with Triton 2.51's blocking response
iterators here. Replies in order, error codes mapped back, and real child cancellation used
where the response iterator has `cancel()` (newer Tritons), not needed where it has none
(2.51: the orchestrator's stop=true does that job)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from typing import Any

import numpy as np

from orchestrator.clients.bls import BlsEngineClient
from orchestrator.wire.errors import ErrorCode
from tests.fake_pb_utils import FakePbUtils, InferenceRequest, InferenceResponse, Tensor, TritonError


def _response(tokens: list[int] | None = None, error: TritonError | None = None) -> InferenceResponse:
    """An engine's response: `tokens` as output_ids, an error, or neither (a flags-only final)."""
    outputs = [] if tokens is None else [Tensor("output_ids", np.array([[tokens]], dtype=np.int32))]
    return InferenceResponse(output_tensors=outputs, error=error)


class _BlockingIterator:
    """Triton 2.51's ResponseIterator: blocking next(); after its responses it waits for more
    (the engine is still generating) until released."""

    def __init__(self, responses: list[InferenceResponse]) -> None:
        self.responses = list(responses)
        self.release = threading.Event()

    def __iter__(self) -> "_BlockingIterator":
        return self

    def __next__(self) -> InferenceResponse:
        if self.responses:
            return self.responses.pop(0)
        self.release.wait(10)
        raise StopIteration


class _CancellableIterator(_BlockingIterator):
    def __init__(self, responses: list[InferenceResponse]) -> None:
        super().__init__(responses)
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1
        self.release.set()


def _client(iterator: "_BlockingIterator | Exception") -> tuple[BlsEngineClient, FakePbUtils]:
    """A client on a fake pb_utils whose one BLS `exec` returns `iterator` (or raises it)."""
    pending = [iterator]

    def exec_(request: InferenceRequest, decoupled: bool) -> _BlockingIterator:
        assert decoupled
        if isinstance(pending[0], Exception):
            raise pending[0]
        iterator = pending.pop()  # like Triton: the caller holds it now
        assert isinstance(iterator, _BlockingIterator)
        return iterator

    pb = FakePbUtils(bls=exec_, ready={"context_0"})
    return BlsEngineClient(pb, ("output_ids",)), pb


def test_replies_arrive_in_order_and_the_request_carries_id_and_parameters() -> None:
    iterator = _BlockingIterator([_response([1]), _response([2, 3]), _response()])  # the last: flags-only
    iterator.release.set()
    client, pb = _client(iterator)

    async def body() -> list[tuple[int, ...]]:
        stream = client.stream(
            "generation_0", {"input_ids": np.zeros((1, 2), np.int32)}, {"request_type": "generation_only"}, "r:gen"
        )
        return [tuple(reply.tensors["output_ids"].reshape(-1)) async for reply in stream]  # type: ignore[index]

    replies = asyncio.run(body())  # one or two replies: ones that queued up while the loop was busy are joined
    assert [t for reply in replies for t in reply] == [1, 2, 3] and len(replies) in (1, 2)
    (sent,) = pb.requests
    assert sent.request_id() == "r:gen" and json.loads(sent.parameters()) == {"request_type": "generation_only"}


def test_engine_errors_map_back_to_their_codes_without_the_prefix() -> None:
    iterator = _BlockingIterator([_response(error=TritonError("NOT_FOUND: no such lease", TritonError.NOT_FOUND))])
    iterator.release.set()
    client, _ = _client(iterator)

    async def body() -> Any:
        return [reply async for reply in client.stream("generation_0", {}, {}, "r:gen")]

    (reply,) = asyncio.run(body())
    assert reply.error.code is ErrorCode.NOT_FOUND and reply.error.message == "no such lease"


def test_abandoning_a_stream_cancels_the_child_where_triton_can() -> None:
    iterator = _CancellableIterator([_response([1])])
    client, _ = _client(iterator)

    async def body() -> None:
        stream = client.stream("generation_0", {}, {}, "r:gen")
        first = await anext(stream)
        assert first.tensors is not None
        await stream.aclose()  # the orchestrator leaves (stop, timeout, client gone)

    asyncio.run(body())
    assert iterator.cancelled == 1


def test_a_stream_read_to_its_end_is_not_cancelled() -> None:
    iterator = _CancellableIterator([_response([1])])
    iterator.release.set()
    client, _ = _client(iterator)

    async def body() -> None:
        assert len([reply async for reply in client.stream("generation_0", {}, {}, "r:gen")]) == 1

    asyncio.run(body())
    assert iterator.cancelled == 0


def test_readiness_is_tritons() -> None:
    client, _ = _client(_BlockingIterator([]))
    assert asyncio.run(client.is_ready("context_0")) and not asyncio.run(client.is_ready("context_9"))


def test_token_replies_waiting_behind_one_are_joined_into_one() -> None:
    """The loop fell behind: three token replies and the end are queued; one reply goes on."""
    from collections import deque

    from orchestrator.clients.bls import _END
    from orchestrator.clients.engine_client import EngineReply

    client, _ = _client(_BlockingIterator([]))

    async def body() -> tuple[EngineReply, list[Any]]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for item in (_response([2]), _response(), _response([3, 4]), _END):
            queue.put_nowait(item)
        pending: deque[Any] = deque()
        first = EngineReply(tensors={"output_ids": np.array([[[1]]], dtype=np.int32)})
        joined = client._coalesce(first, queue, pending)
        return joined, list(pending)

    joined, pending = asyncio.run(body())
    assert joined.tensors is not None and joined.tensors["output_ids"].tolist() == [[[1, 2, 3, 4]]]
    assert pending == [_END] and client.coalesced == 2


def test_an_error_behind_token_replies_is_kept_for_after_them() -> None:
    from collections import deque

    from orchestrator.clients.engine_client import EngineReply

    client, _ = _client(_BlockingIterator([]))
    failure = _response(error=TritonError("UNAVAILABLE: crashed", TritonError.UNAVAILABLE))

    async def body() -> tuple[EngineReply, list[Any]]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        queue.put_nowait(failure)
        pending: deque[Any] = deque()
        return client._coalesce(
            EngineReply(tensors={"output_ids": np.array([[[1]]], dtype=np.int32)}), queue, pending
        ), list(pending)

    joined, pending = asyncio.run(body())
    assert joined.tensors is not None and joined.tensors["output_ids"].tolist() == [[[1]]] and pending == [failure]


def test_the_code_word_prefix_wins_over_the_generic_code_bls_delivers() -> None:
    """Through BLS, Triton 2.51 gives the caller a generic code; the engine's prefix is the truth."""
    lost = _response(
        error=TritonError("NOT_FOUND: context engine 'context_1' refused the KV pull", TritonError.INTERNAL)
    )
    iterator = _BlockingIterator([lost])
    iterator.release.set()
    client, _ = _client(iterator)

    async def body() -> Any:
        return [reply async for reply in client.stream("generation_0", {}, {}, "r:gen")]

    (reply,) = asyncio.run(body())
    assert reply.error.code is ErrorCode.NOT_FOUND
    assert reply.error.message == "context engine 'context_1' refused the KV pull"


def test_a_finished_iterator_is_held_by_the_fence_until_a_round_trip_crosses_it() -> None:
    """Triton 2.51's stub drops its own reference to a finished iterator later, off the GIL:
    ours must outlive it (orchestrator/runtime/stub_fence.py)."""
    iterator = _BlockingIterator([_response([1]), _response([2])])
    iterator.release.set()
    client, _ = _client(iterator)
    alive = weakref.ref(iterator)
    del iterator

    async def body() -> int:
        return len([reply async for reply in client.stream("generation_0", {}, {}, "r:gen")])

    assert asyncio.run(body()) >= 1
    gc.collect()
    assert client.fence.backlog == 1 and alive() is not None
    assert client.fence.cross(lambda: True) is True  # a cached "cancelled" may not have crossed
    gc.collect()
    assert client.fence.backlog == 1 and alive() is not None
    assert client.fence.cross(lambda: False) is False
    gc.collect()
    assert client.fence.backlog == 0 and alive() is None


def test_an_engine_that_refuses_the_request_is_unavailable() -> None:
    client, _ = _client(RuntimeError("Failed for execute the inference request. Model 'generation_0' is not ready."))

    async def body() -> Any:
        return [reply async for reply in client.stream("generation_0", {}, {}, "r:gen")]

    (reply,) = asyncio.run(body())
    assert reply.error.code is ErrorCode.UNAVAILABLE
    assert reply.error.message.startswith("engine 'generation_0' could not take the request: Failed for execute")
    assert client.fence.backlog == 0
