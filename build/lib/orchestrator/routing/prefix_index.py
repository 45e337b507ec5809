"""Router-side prefix index: which prompt blocks an engine probably holds in its KV cache.

The engines hash full KV blocks with `orchestrator.wire.block_hash` (fixed seed, chained,
so one hash names a whole prefix). The router computes the same hashes from a request's
token ids and remembers, per engine, the hashes of prompts it sent there, in LRU order and
bounded by the engine's block count, the way the engine's own free queue evicts. A hit is
a prediction, not a promise: the engine decides at admission and reports what it really
reused in the `kv_cache_reused_blocks` perf output.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class PrefixIndex:
    """One engine's predicted cached blocks (hash -> None), most recently used last."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"a prefix index needs capacity >= 1 block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt are predicted to be cached (chained: stop at the first miss)."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            matched += 1
        return matched

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the engine now holds these blocks; evicts the least recently used beyond capacity.

        Inserted tail first, so a prompt's first blocks are the freshest: a shared prefix
        outlives the tails hanging off it, and a chain is never cut in the middle first.
        """
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the engine failed: it may have restarted with an empty cache)."""
        self._blocks.clear()
