"""The paged KV cache's block pool: fixed blocks, reference counts, prefix cache, LRU.

State (all owned here, nothing else mutates it):
- `ref_count[b]`: how many holders use block b (sequences, leases); 0 means free;
- the free queue: every block with ref_count 0, least recently freed first. Allocation
  takes from the front, so a freed block that still holds a cached prefix survives as long
  as possible (LRU eviction of cached-but-free blocks);
- `cached`: prefix hash -> block, and its inverse; a free block that is allocated for new
  data loses its hash (it is evicted).

Errors in three tiers, as in the engine's other layers: running out of blocks returns
None (the scheduler waits); a caller's mistake raises ValueError; a broken invariant is an
assertion that names the bug.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class BlockPool:
    """Joins the KV cache manager (who holds which block) to the physical block ids."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (empty, or cached and unused)."""
        return len(self._free)

    def free_order(self) -> list[int]:
        """The free queue, next to be allocated first (for tests and debugging)."""
        return list(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for new data, or None (nothing taken) if the pool cannot give them."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if block in self._hash_of:  # reusing a cached-but-free block evicts its prefix
                del self._by_hash[self._hash_of.pop(block)]
                self.evictions += 1
            assert self.ref_count[block] == 0, f"bug: block {block} was in the free queue while in use"
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: int) -> int | None:
        """The block caching this prefix hash, if any (in use or free)."""
        return self._by_hash.get(block_hash)

    def acquire(self, block: int) -> None:
        """Take one more reference to a block (a prefix-cache hit or a lease)."""
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 join the free queue's tail.

        Callers pass a sequence's blocks tail first, so its last blocks (the least likely to
        be shared by another prompt) are evicted before its first ones.
        """
        for block in blocks:
            assert self.ref_count[block] > 0, f"bug: block {block} released more times than acquired"
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self._free[block] = None

    def register(self, block: int, block_hash: int) -> bool:
        """Record that `block` holds the prefix `block_hash`; False if another block already does."""
        assert self.ref_count[block] > 0, f"bug: registering free block {block}"
        if block_hash in self._by_hash or block in self._hash_of:
            return False
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def hash_of(self, block: int) -> int | None:
        return self._hash_of.get(block)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def check(self) -> None:
        """Assert the pool's invariants (tests call this after every scenario)."""
        free = set(self._free)
        for block, count in enumerate(self.ref_count):
            assert count >= 0, f"bug: block {block} has ref_count {count}"
            assert (count == 0) == (block in free), f"bug: block {block} ref_count {count} vs free queue"
        assert len(self._by_hash) == len(self._hash_of)
