"""Loopback ports for the servers tests and benchmarks start: free, and nobody else's to take.

Why a module of its own: a tritonserver binds its ports only after loading its models,
seconds after they were chosen, so a port must stay free in between; see `free_port`.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()  # ports this process already chose (their servers may not have bound them yet)


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The ports the OS gives to binds of port 0 and to outgoing connections (Linux's default if unknown)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(rng: random.Random | None = None) -> int:
    """A loopback TCP port that is free right now, chosen outside the OS's ephemeral range.

    Why not let the OS pick (bind port 0): a tritonserver binds its ports only after loading
    its models, seconds later, and in between the OS hands ephemeral ports to anything that
    asks, the server's own stub engines (their KV transfer servers bind port 0) and every
    outgoing connection included: one such collision failed a server start in CI ("Socket
    already in use"). Ports below the ephemeral range are handed out by nobody but us.
    """
    rng = rng or random.Random()
    low, high = ephemeral_range()
    first, last = (10000, low - 1) if low - 10000 >= 2000 else (high + 1, 65535)
    for _ in range(1000):
        port = rng.randint(first, last)
        if port in _handed_out:
            continue
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use now
        _handed_out.add(port)
        return port
    raise OSError(f"no free loopback port found in {first}-{last} after 1000 tries")
