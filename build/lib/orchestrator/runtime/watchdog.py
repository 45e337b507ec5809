"""Turn a stuck python-backend stub into a dead one, which can be restarted.

Triton 2.51's python backend can deadlock a stub that streams decoupled BLS responses: a
thread starting a child request holds the GIL and waits for the stub's iterator-map lock,
the stub's message thread holds that lock and waits for one iterator's lock, and that
iterator's reader, just woken, holds it and waits for the GIL (README: "The BLS stub
crash"). No Python code runs in the process again, Triton keeps reporting the model ready,
and its requests never end. Python cannot rule the cycle out (every decoupled `exec` takes
the map lock while holding the GIL), so the model notices it instead.

`faulthandler`'s timer is a C thread that needs no GIL: the loop re-arms it every
`timeout_s / 4`; a loop that has not run for `timeout_s` gets every thread's Python stack
written to stderr (the server log) and the process ends with exit status 1. To Triton that
is a dead stub, which the supervisor (orchestrator/ops/supervisor.py) reloads.
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys


class StuckExit:
    """Re-arms `faulthandler.dump_traceback_later(timeout_s, exit=True)` from a running loop.

    One per process (faulthandler has one timer): the stub process of one model instance.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"StuckExit needs a timeout > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """On the loop to watch (call from its thread)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._rearm())

    async def _rearm(self) -> None:
        while True:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
            await asyncio.sleep(self.timeout_s / 4)

    def stop(self) -> None:
        """Disarm before the loop stops on purpose (unload); on the loop's thread, so that no
        re-arm can come after it."""
        if self._task is not None:
            self._task.cancel()
        faulthandler.cancel_dump_traceback_later()
