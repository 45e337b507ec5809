"""A deterministic next-token model that reads and writes a real paged KV cache.

Why this model: tests need an oracle. Every next token is computed from the K/V values
in the engine's blocks, so a generation engine whose blocks arrived damaged, out of
order, or in the wrong parallel layout produces different tokens, and the aggregated and
disaggregated paths agree only if the cache crossed intact.

What a position's K/V holds. Position p (token t_p, previous token t_{p-1}) stores four
32-bit values, each spread over every (layer, head) pair as 2-bit digits (16 pairs x
2 bits), and each digit stored as `digit * w + b` with fixed weights `w`, `b` per (layer,
K/V, head, dim) drawn from a seeded generator:

    K[.., dim 0] = t_{p-1} + 1  (0 at p = 0)     K[.., dim 1] = p
    V[.., dim 0] = t_p                           V[.., dim 1] = p

Since every head of every layer holds part of every value, losing, swapping or
mis-sharding any head or layer changes what is read back.

The rule (an "induction head" done as hard attention): the query is the last cached
token q; it attends to the latest position p whose K says "preceded by q", and the
answer is V's token at p: the token that followed q's previous occurrence. With no match
(or, when sampling, at steps picked by a hash of the sampling key) it reads the token at
a hashed position instead. It continues prompts by copying runs of them, so output is
readable text that splits multi-byte characters across tokens as byte-level models do.

The `index` (previous token -> latest position) is the attention's argmax kept up to
date as positions are written; after a transfer it is rebuilt by reading the received K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from orchestrator.engine.kv_layout import DTYPE, Geometry
from orchestrator.engine.kv_store import KVStore

_MASK = 0xFFFFFFFF
MODEL_SEED = 20261121
BITS = 2  # digit width; layers * heads * BITS must cover 32 bits


def _mix(*values: int) -> int:
    """A small, fixed integer hash (stable across processes, unlike salted hash())."""
    h = 0x811C9DC5
    for v in values:
        h = ((h ^ (v & _MASK)) * 0x01000193) & _MASK
        h ^= h >> 15
    return h


@dataclass(slots=True)
class SequenceKV:
    """One sequence's view of the cache: its block table, length and attention index."""

    key: int
    table: list[int] = field(default_factory=list)
    length: int = 0  # positions written
    index: dict[int, int] = field(default_factory=dict)


class InductionModel:
    """Stateless rules over a KVStore; one instance serves every sequence of an engine."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        slots = geometry.layers * geometry.heads
        if slots * BITS < 32 or geometry.head_dim < 2:
            raise ValueError(f"the model needs layers*heads >= {32 // BITS} and head_dim >= 2, got {geometry}")
        rng = np.random.default_rng(MODEL_SEED)
        shape = (geometry.layers, 2, geometry.heads, geometry.head_dim)
        self._w = rng.uniform(0.5, 2.0, shape).astype(DTYPE)
        self._b = rng.uniform(-1.0, 1.0, shape).astype(DTYPE)
        self._shifts = (np.arange(slots, dtype=np.uint64) * BITS).reshape(geometry.layers, geometry.heads)

    # -- encoding ---------------------------------------------------------------------
    def _encode(self, kv: int, dim: int, values: np.ndarray, out: np.ndarray) -> None:
        """out[:, :, kv, :, dim] = digits of `values` (uint32 [n]) scaled by this slot's weights."""
        digits = (values[:, None, None].astype(np.uint64) >> self._shifts[None]) & ((1 << BITS) - 1)
        out[:, :, kv, :, dim] = digits.astype(DTYPE) * self._w[None, :, kv, :, dim] + self._b[None, :, kv, :, dim]

    def _decode(self, kv: int, dim: int, slots: np.ndarray) -> np.ndarray:
        """Inverse of _encode for canonical slots [n, L, 2, H, D] -> int64 values [n]."""
        x = (slots[:, :, kv, :, dim] - self._b[None, :, kv, :, dim]) / self._w[None, :, kv, :, dim]
        digits = np.clip(np.rint(x), 0, (1 << BITS) - 1).astype(np.uint64)
        return (digits << self._shifts[None]).sum(axis=(1, 2)).astype(np.int64)

    def kv_values(self, tokens: Sequence[int], start: int, previous: int | None) -> np.ndarray:
        """Canonical K/V [n, L, 2, H, D] of `tokens` at positions start.. (previous = t_{start-1})."""
        g = self.geometry
        toks = np.asarray(tokens, dtype=np.int64) & _MASK
        prev = np.empty_like(toks)
        prev[0] = 0 if previous is None else (previous + 1) & _MASK
        prev[1:] = (toks[:-1] + 1) & _MASK
        pos = np.arange(start, start + len(toks), dtype=np.int64)
        out = np.zeros((len(toks), g.layers, 2, g.heads, g.head_dim), dtype=DTYPE)
        self._encode(0, 0, prev, out)
        self._encode(0, 1, pos, out)
        self._encode(1, 0, toks, out)
        self._encode(1, 1, pos, out)
        return out

    # -- sequence operations ------------------------------------------------------------
    def write(self, store: KVStore, seq: SequenceKV, tokens: Sequence[int], previous: int | None) -> None:
        """Append `tokens` to the sequence's cache (its table must already have room)."""
        start = seq.length
        store.write_slots(seq.table, start, self.kv_values(tokens, start, previous))
        seq.length += len(tokens)
        self.reindex(store, seq, start)

    def reindex(self, store: KVStore, seq: SequenceKV, start: int = 0) -> None:
        """Update the attention index from the K stored at positions start..length."""
        if start >= seq.length:
            return
        keys = self._decode(0, 0, store.read_slots(seq.table, start, seq.length - start))
        for offset, k in enumerate(keys.tolist()):
            seq.index[_signed(k - 1)] = start + offset  # later positions overwrite: latest wins

    def token_at(self, store: KVStore, seq: SequenceKV, position: int) -> int:
        return _signed(int(self._decode(1, 0, store.read_slots(seq.table, position, 1))[0]))

    def next_token(self, store: KVStore, seq: SequenceKV) -> int:
        """The next token, computed from the cached K/V only."""
        last = store.read_slots(seq.table, seq.length - 1, 1)
        query = _signed(int(self._decode(1, 0, last)[0]))
        n = int(self._decode(0, 1, last)[0]) + 1  # the position stored in K, not our counter
        jump = seq.key != 0 and _mix(seq.key, n) % 5 == 0
        match = seq.index.get(query)
        if match is not None and not jump and match < seq.length:
            return self.token_at(store, seq, match)
        return self.token_at(store, seq, _mix(seq.key, n, query) % max(1, min(n, seq.length)))

    def last_token(self, store: KVStore, seq: SequenceKV) -> int:
        return self.token_at(store, seq, seq.length - 1)


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 32) if value >= 1 << 31 else value
