"""Which blocks each sequence holds: prefix matching, admission, growth, release.

Admission follows TensorRT-LLM's GUARANTEED_NO_EVICT policy: a request is admitted only
if the pool can give it every block it may ever need (prompt plus `max_tokens`), so a
running sequence never stalls or gets preempted for lack of memory. Blocks beyond the
prompt are *reserved* (counted, not taken) and handed out one at a time as decoding
crosses block boundaries. A request that does not fit waits in the queue; it is not
failed, unless it could not fit even in an empty pool.

Prefix caching: the prompt's full blocks are looked up by chained hash
(`block_hash.py`); hits are shared (one more reference), misses are allocated. Blocks are
registered in the cache as soon as they are full, so a sequence still running already
serves later prompts that share its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from orchestrator.stub_engine.block_pool import BlockPool
from orchestrator.wire.block_hash import SEED, block_hashes, chain_hash


@dataclass(slots=True)
class Allocation:
    """One holder's blocks (a sequence, then possibly a lease) and its accounting."""

    blocks: list[int]
    reused: int  # prefix-cache hits at admission
    new: int  # blocks allocated for new data, growth included
    reserved: int  # blocks promised for growth, not yet taken
    hashes: list[int] = field(default_factory=list)  # chain hashes of its full blocks, in order
    cached_tokens: int = 0  # leading tokens whose KV was found in the cache (no prefill needed)


class KVCacheManager:
    """Joins the scheduler (admit, grow, release) to the block pool (blocks, hashes)."""

    def __init__(self, pool: BlockPool, tokens_per_block: int, enable_reuse: bool = True) -> None:
        self.pool = pool
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self.reserved = 0  # blocks promised to running sequences and not yet allocated

    @property
    def available(self) -> int:
        """Blocks an admission may still count on."""
        return self.pool.num_free - self.reserved

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    def fits_empty(self, max_tokens: int) -> bool:
        """Could a request needing `max_tokens` slots ever be admitted?"""
        return self.blocks_for(max_tokens) <= self.pool.num_blocks

    def match(self, hashes: Sequence[int], limit: int | None = None) -> list[int]:
        """Blocks caching the longest prefix of `hashes` (at most `limit` of them)."""
        hits: list[int] = []
        if not self.enable_reuse:
            return hits
        for h in hashes[:limit]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def admit(
        self, prompt: Sequence[int], max_tokens: int, hashes: Sequence[int] | None = None, max_hits: int | None = None
    ) -> Allocation | None:
        """Blocks for `prompt` now and up to `max_tokens` slots in all, or None (wait).

        `hashes` are the prompt's block hashes if the caller has them; `max_hits` caps the
        prefix reuse (a generation engine always pulls at least the last block).
        """
        if max_tokens < len(prompt):
            raise ValueError(f"max_tokens={max_tokens} is below the prompt's {len(prompt)} tokens")
        if hashes is None:
            hashes = block_hashes(prompt, self.tokens_per_block) if self.enable_reuse else []
        hits = self.match(hashes, max_hits)
        hashes = list(hashes[: len(hits)])
        now = self.blocks_for(len(prompt)) - len(hits)
        later = self.blocks_for(max_tokens) - self.blocks_for(len(prompt))
        free_hits = sum(1 for b in hits if self.pool.ref_count[b] == 0)  # they leave the free queue
        if now + free_hits + later > self.available:
            return None
        for block in hits:
            self.pool.acquire(block)
        fresh = self.pool.allocate(now)
        assert fresh is not None, "bug: admission counted blocks the pool does not have"
        self.reserved += later
        return Allocation(
            blocks=hits + fresh, reused=len(hits), new=now, reserved=later, hashes=hashes,
            cached_tokens=len(hits) * self.tokens_per_block,
        )  # fmt: skip

    def ensure(self, alloc: Allocation, tokens: int) -> None:
        """Make room for `tokens` slots, taking reserved blocks as the sequence grows."""
        while len(alloc.blocks) * self.tokens_per_block < tokens:
            assert alloc.reserved > 0, "bug: a sequence grew past the blocks admission reserved for it"
            block = self.pool.allocate(1)
            assert block is not None, "bug: a reserved block was not available"
            alloc.reserved -= 1
            self.reserved -= 1
            alloc.new += 1
            alloc.blocks.extend(block)

    def commit(self, alloc: Allocation, tokens: Sequence[int], known: Sequence[int] = ()) -> None:
        """Register every newly full block of `tokens` (the holder's sequence) in the prefix cache.

        `known`: hashes of the sequence's leading blocks computed already (its prompt's, at
        intake); they are used instead of hashing those blocks again.
        """
        if not self.enable_reuse:
            return
        t = self.tokens_per_block
        while (len(alloc.hashes) + 1) * t <= len(tokens):
            i = len(alloc.hashes)
            parent = alloc.hashes[-1] if alloc.hashes else SEED
            h = known[i] if i < len(known) else chain_hash(parent, tokens[i * t : (i + 1) * t])
            self.pool.register(alloc.blocks[i], h)
            alloc.hashes.append(h)

    def unreserve(self, alloc: Allocation) -> None:
        """Give back the growth promise (the sequence will not decode here any more)."""
        self.reserved -= alloc.reserved
        alloc.reserved = 0

    def release(self, alloc: Allocation) -> None:
        """Drop the holder's blocks (tail first, so its last blocks are evicted first)."""
        self.unreserve(alloc)
        self.pool.release(reversed(alloc.blocks))
        alloc.blocks = []

    def check_idle(self) -> None:
        """Assert that nothing holds a block or a reservation (tests' no-leak check)."""
        self.pool.check()
        held = [b for b, n in enumerate(self.pool.ref_count) if n]
        assert not held and self.reserved == 0, f"leak: blocks {held} held, {self.reserved} reserved"
