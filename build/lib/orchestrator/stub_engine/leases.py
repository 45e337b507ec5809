"""Leases: a finished prefill's blocks, held by a context engine until they are pulled.

After a context_only request ends, its KV blocks must outlive it until a generation
engine has copied them. A lease holds them (one reference per block) under a random
64-bit id that travels in `context_phase_params`. It ends when:

- a pull completes (the puller said DONE): the blocks are released at once;
- nobody pulled it within `timeout_s`: it expires and releases them, so a lost handoff
  (client gone, orchestrator crashed, generation engine down) never leaks memory.

A lease being read (pinned) does not expire mid-transfer; its expiry waits for the pull
to end. Released blocks keep their prefix hashes, so a later prompt can still reuse them.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Callable

from orchestrator.stub_engine.kv_cache import Allocation, KVCacheManager


@dataclass(slots=True)
class Lease:
    lease_id: int
    alloc: Allocation
    num_tokens: int
    owner: str = ""  # the context_only request id that produced it (a stop for that id drops it)
    pins: int = 0
    expired: bool = False
    timer: asyncio.TimerHandle | None = None


class LeaseTable:
    """Joins finished context-phase allocations to the transfer server that serves them."""

    def __init__(self, kv: KVCacheManager, timeout_s: float, on_release: Callable[[], None] = lambda: None) -> None:
        self.kv = kv
        self.timeout_s = timeout_s
        self._on_release = on_release  # the scheduler may admit a waiting request now
        self._leases: dict[int, Lease] = {}
        self.expired = 0
        self.completed = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._leases)

    def create(self, alloc: Allocation, num_tokens: int, owner: str = "") -> int:
        """Take over `alloc`'s blocks (its growth reservation is dropped) until pulled or expired."""
        self.kv.unreserve(alloc)
        lease_id = secrets.randbits(63) or 1
        lease = Lease(lease_id, alloc, num_tokens, owner)
        lease.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, lease_id)
        self._leases[lease_id] = lease
        return lease_id

    def pin(self, lease_id: int) -> Lease | None:
        """The live lease with this id, protected from expiry until `unpin`; None if gone or busy.

        One puller at a time: a second concurrent pull of the same lease is refused, so a
        completed pull can never free blocks that another is still reading.
        """
        lease = self._leases.get(lease_id)
        if lease is None or lease.expired or lease.pins:
            return None
        lease.pins += 1
        return lease

    def unpin(self, lease: Lease, done: bool) -> None:
        """End a pull: `done` releases the lease; otherwise it stays for a retry until expiry."""
        lease.pins -= 1
        if done:
            self.completed += 1
            self._end(lease)
        elif lease.expired and lease.pins == 0:
            self._end(lease)

    def drop(self, lease_id: int) -> bool:
        """End a lease now (its request was stopped, or a fault drill): as expiry, but at once."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        lease.expired = True  # a pull in progress finishes; nobody can pin it again
        self.dropped += 1
        if lease.pins == 0:
            self._end(lease)
        return True

    def drop_owned(self, owner: str) -> int:
        """Drop every lease the request `owner` produced; returns how many."""
        if not owner:
            return 0
        return sum(self.drop(lease.lease_id) for lease in list(self._leases.values()) if lease.owner == owner)

    def _expire(self, lease_id: int) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.expired = True
        self.expired += 1
        if lease.pins == 0:
            self._end(lease)

    def _end(self, lease: Lease) -> None:
        if self._leases.pop(lease.lease_id, None) is None:
            return
        if lease.timer is not None:
            lease.timer.cancel()
        self.kv.release(lease.alloc)
        self._on_release()

    def close(self) -> None:
        """Release every lease (engine shutdown)."""
        for lease in list(self._leases.values()):
            self._end(lease)
