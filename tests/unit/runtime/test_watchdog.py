"""StuckExit in real processes: a loop that stops running ends its process with status 1
and every thread's stack on stderr; a watchdog stopped on purpose (unload) does not."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.tools.launch import REPO_ROOT

_PROGRAM = r"""
import asyncio, sys, time
from orchestrator.runtime.watchdog import StuckExit

async def main(stop_first):
    watchdog = StuckExit(0.5)
    watchdog.start()
    await asyncio.sleep(0.3)  # re-armed while the loop runs
    if stop_first:
        watchdog.stop()
    time.sleep(2.0)  # the loop is stuck (a deadlocked stub: nothing runs Python here)
    print("the loop ran again", flush=True)

asyncio.run(main(sys.argv[1] == "stop"))
"""


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )


def test_a_stuck_loop_ends_its_process_with_every_threads_stack() -> None:
    done = _run("stuck")
    assert done.returncode == 1
    assert "the loop ran again" not in done.stdout
    assert "Timeout" in done.stderr and 'File "<string>"' in done.stderr  # faulthandler's dump: where it was stuck


def test_a_stopped_watchdog_lets_the_loop_block() -> None:
    done = _run("stop")
    assert done.returncode == 0 and "the loop ran again" in done.stdout
