"""Keep finished BLS response iterators alive until the python backend stub has let go of them.

Triton 2.51's stub (python_backend r24.10) keeps each decoupled BLS response iterator in a
map, together with every response it has delivered. Reading the final response queues a
cleanup message; the stub's stub-to-parent thread later erases the map entry, without the
GIL. When Python has dropped its own reference by then, that erase destroys the iterator
and every response's numpy arrays off the GIL: a refcount race with our threads that
corrupts the heap long after the fact.

That queue is first-in first-out and served by one thread, and `request.is_cancelled()`
travels through it and waits for its answer. Once such a call has returned, every cleanup
queued before it has run and the stub holds no iterator that was finished before it. So a
finished iterator is `retire`d here and released only after a later round trip has
`cross`ed the queue; from then on Python owns the last reference, and destroying the
iterator happens under the GIL.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class StubFence:
    """Objects waiting for the stub's cleanup queue to be crossed (thread-safe)."""

    __slots__ = ("_lock", "_retired")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retired: list[Any] = []

    @property
    def backlog(self) -> int:
        """How many retired objects are still held."""
        return len(self._retired)

    def retire(self, obj: Any) -> None:
        """Hold `obj` until a crossing that starts after this call (any thread)."""
        with self._lock:
            self._retired.append(obj)

    def cross(self, round_trip: Callable[[], Any]) -> Any:
        """Call `round_trip` (`request.is_cancelled()`) and release what was retired before it.

        A True answer may be the stub's cached flag (a cancelled request is not asked again),
        and an exception may mean the call never reached the queue: both keep what was held
        for the next crossing.
        """
        with self._lock:
            held, self._retired = self._retired, []
        passed = False
        try:
            answer = round_trip()
            passed = not answer
            return answer
        finally:
            if not passed and held:
                with self._lock:
                    self._retired[:0] = held
            del held  # released here, on the caller's thread, with the GIL
