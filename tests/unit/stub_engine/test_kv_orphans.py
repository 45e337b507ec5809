"""A KV segment whose creating process died is removed by the next store; a live creator's
segment and anything not named like ours are left alone (real processes, a real folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.stub_engine.kv_store import remove_orphans


def test_segments_of_dead_creators_are_removed_and_nothing_else(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    names = {
        f"dkv_generation_0_{dead_pid}_0a1b2c3d": False,  # its creator exited: removed
        f"dkv_context_1_{os.getpid()}_deadbeef": True,  # this test's process is alive: kept
        f"triton_python_backend_shm_region_{dead_pid}": True,  # not ours
        f"dkv_notes_{dead_pid}": True,  # not our name's form
    }
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 16)
    assert remove_orphans(tmp_path) == [f"dkv_generation_0_{dead_pid}_0a1b2c3d"]
    assert {p.name for p in tmp_path.iterdir()} == {name for name, kept in names.items() if kept}
