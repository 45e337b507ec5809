"""StubFence: what is retired stays referenced until a round trip that started after it
has answered "not cancelled" (orchestrator/runtime/stub_fence.py says why)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from orchestrator.runtime.stub_fence import StubFence


class _Held:
    pass


def test_only_objects_retired_before_the_round_trip_are_released() -> None:
    fence = StubFence()
    first, second = _Held(), _Held()
    refs = weakref.ref(first), weakref.ref(second)
    fence.retire(first)
    del first

    def round_trip() -> bool:
        fence.retire(second_holder.pop())  # retired while the round trip is under way
        return False

    second_holder = [second]
    del second
    assert fence.cross(round_trip) is False
    gc.collect()
    assert refs[0]() is None and refs[1]() is not None and fence.backlog == 1
    fence.cross(lambda: False)
    gc.collect()
    assert refs[1]() is None and fence.backlog == 0


def test_a_round_trip_that_fails_keeps_everything_for_the_next_one() -> None:
    fence = StubFence()
    fence.retire(_Held())

    def broken() -> bool:
        raise RuntimeError("Cannot communicate with parent service")

    with pytest.raises(RuntimeError):
        fence.cross(broken)
    assert fence.backlog == 1
    assert fence.cross(lambda: True) is True  # cancelled: the stub may answer from its cache
    assert fence.backlog == 1
    fence.cross(lambda: False)
    assert fence.backlog == 0


def test_retiring_from_many_threads_loses_nothing() -> None:
    fence = StubFence()
    threads = [threading.Thread(target=lambda: [fence.retire(_Held()) for _ in range(500)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fence.backlog == 2000
    fence.cross(lambda: False)
    assert fence.backlog == 0
