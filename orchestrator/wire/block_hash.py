"""Prefix-cache block hashes: chained over full blocks, with a fixed seed.

A block's hash names the whole prefix that ends with it, not only its own tokens:

    h_0 = H(SEED,    tokens[0:T],   extra)
    h_i = H(h_{i-1}, tokens[iT:(i+1)T], extra)

so two sequences share block i's cached KV only if they agree on every token up to the
end of block i (a block's K/V depends on all tokens before it). Only full blocks get a
hash; a partial tail block is never shared.

`H` is BLAKE2b-64 over little-endian int64 words (parent, then tokens, then extra keys,
e.g. a LoRA id). The seed is fixed and documented (`SEED`) so a router in another process
can compute the same hashes from token ids and predict cache hits on each engine.
Python's built-in `hash()` is salted per process for strings and is not used.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

SEED = 0x6B76_6361_6368_6531  # b"kvcache1" read as a big-endian u64; never change it
_MASK64 = (1 << 64) - 1


_HEAD = struct.Struct("<Qq")  # parent hash, token count


def _words(values: Sequence[int]) -> bytes:
    """Little-endian int64 words (one struct call: the fastest packing of a long prompt measured)."""
    return struct.pack(f"<{len(values)}q", *values)


def chain_hash(parent: int, tokens: Sequence[int], extra: Sequence[int] = ()) -> int:
    """Hash of one block given its parent's hash (or SEED for the first block)."""
    h = hashlib.blake2b(_HEAD.pack(parent & _MASK64, len(tokens)), digest_size=8)
    h.update(_words(tokens))
    if extra:
        h.update(_words(extra))
    return int.from_bytes(h.digest(), "little")


def block_hashes(tokens: Sequence[int], tokens_per_block: int, extra: Sequence[int] = ()) -> list[int]:
    """Hashes of every full block of `tokens`, in order (the partial tail has none).

    Equal to chaining `chain_hash` block by block; the words are packed once for the whole
    prompt and sliced per block (a long prompt's hashes are on every request's path).
    """
    if tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
    full = len(tokens) // tokens_per_block * tokens_per_block
    if full == 0:
        return []
    packed = memoryview(_words(tokens[:full]))
    tail = _words(extra)
    width = 8 * tokens_per_block
    hashes: list[int] = []
    parent = SEED
    for start in range(0, 8 * full, width):
        h = hashlib.blake2b(_HEAD.pack(parent, tokens_per_block), digest_size=8)
        h.update(packed[start : start + width])
        if tail:
            h.update(tail)
        parent = int.from_bytes(h.digest(), "little")
        hashes.append(parent)
    return hashes


def prompt_digest(tokens: Sequence[int]) -> int:
    """One hash of a whole token sequence, partial tail included (identifies a prompt)."""
    return chain_hash(SEED, tokens)
