"""An asyncio loop on a thread of our own, for the python backend models.

Triton 2.51's stub runs an `async def execute` of a decoupled model in the background and
registers its future only after starting it; when the coroutine finishes first (ours
return at once), the stub logs `Cannot remove future from background; KeyError` and,
under load on a busy machine, the stub process has crashed (heap corruption, SIGSEGV:
triton-inference-server/server#8537, #8841, #8882). So our models keep a plain `execute`
that hands each batch of requests to this loop and returns: the stub's async machinery
is never used. Decoupled models may answer from any thread (the python backend's own
decoupled examples do): our responses leave from an outbox's sender thread
(orchestrator/runtime/outbox.py), everything else a model does happens on this one thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine


class LoopThread:
    """A daemon thread running one event loop until `stop()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon (from any thread)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        """Run a coroutine on the loop and wait for its result (never from the loop's own thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
