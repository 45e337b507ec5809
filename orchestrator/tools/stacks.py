"""A server's processes from /proc, and their native stacks: what a stalled server waits on.

Used by the soak and the BLS stress reproducer to say which stub died and, when requests
stall, to save every thread's stack (gdb) of tritonserver and each python backend stub.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def process_tree(pid: int) -> dict[int, str]:
    """`pid` and its live descendants (the python backend stubs) from /proc: pid -> a short
    name (a stub is named by its model folder: .../orchestrator/1/model.py -> orchestrator).
    A dead child the server has not reaped yet (a zombie) is not live."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry.name))
    tree: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, ()))
        if _state(p) in ("Z", "X"):
            continue
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        model = next((Path(a.decode()).parent.parent.name for a in argv if a.endswith(b"/model.py")), "")
        tree[p] = model or Path(argv[0].decode()).name
    return tree


def dump_threads(server_pid: int, dest: Path) -> None:
    """Every thread's native stack of the server and its stubs (gdb), one file per process:
    what a stall is waiting on."""
    dest.mkdir(parents=True, exist_ok=True)
    for pid, name in process_tree(server_pid).items():
        with open(dest / f"{name}-{pid}.txt", "w") as out:
            subprocess.run(
                ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
