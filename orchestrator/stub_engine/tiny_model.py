"""A deterministic next-token model that reads and writes a real paged KV cache.

Why this model: tests need an oracle. Every next token is computed from the K/V values
in the engine's blocks, so a generation engine whose blocks arrived damaged, out of
order, or in the wrong parallel layout produces different tokens, and the aggregated and
disaggregated paths agree only if the cache crossed intact.

What a position's K/V holds. Position p (token t_p, previous token t_{p-1}) stores four
32-bit values, each spread over every (layer, head) pair as 1-bit digits (32 pairs x
1 bit; fewer pairs get wider digits), and each digit stored as `digit * w + b` with fixed weights `w`, `b` per (layer,
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

from orchestrator.stub_engine.kv_layout import DTYPE, Geometry
from orchestrator.stub_engine.kv_store import KVStore

_MASK = 0xFFFFFFFF
MODEL_SEED = 20261121
MAX_SLOTS = 32  # (layer, head) pairs a 32-bit value can spread over, one bit each at least


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
        if slots > MAX_SLOTS or geometry.head_dim < 2:
            raise ValueError(f"the model needs layers*heads <= {MAX_SLOTS} and head_dim >= 2, got {geometry}")
        self._bits = -(-32 // slots)  # digit width: every pair holds a digit of every value
        rng = np.random.default_rng(MODEL_SEED)
        shape = (geometry.layers, 2, geometry.heads, geometry.head_dim)
        self._w = rng.uniform(0.5, 2.0, shape).astype(DTYPE)
        self._b = rng.uniform(-1.0, 1.0, shape).astype(DTYPE)
        self._shifts = (np.arange(slots, dtype=np.uint64) * self._bits).reshape(geometry.layers, geometry.heads)

    # -- encoding ---------------------------------------------------------------------
    def _encode(self, kv: int, dim: int, values: np.ndarray, out: np.ndarray) -> None:
        """out[:, :, kv, :, dim] = digits of `values` (uint32 [n]) scaled by this slot's weights."""
        digits = (values[:, None, None].astype(np.uint64) >> self._shifts[None]) & ((1 << self._bits) - 1)
        out[:, :, kv, :, dim] = digits.astype(DTYPE) * self._w[None, :, kv, :, dim] + self._b[None, :, kv, :, dim]

    def _decode(self, kv: int, dim: int, slots: np.ndarray) -> np.ndarray:
        """Inverse of _encode for canonical slots [n, L, 2, H, D] -> int64 values [n]."""
        x = (slots[:, :, kv, :, dim] - self._b[None, :, kv, :, dim]) / self._w[None, :, kv, :, dim]
        digits = np.clip(np.rint(x), 0, (1 << self._bits) - 1).astype(np.uint64)
        return (digits << self._shifts[None]).sum(axis=(1, 2)).astype(np.int64)

    def kv_values(self, tokens: Sequence[int], start: int, previous: int | None) -> np.ndarray:
        """Canonical K/V [n, L, 2, H, D] of `tokens` at positions start.. (previous = t_{start-1})."""
        toks = np.asarray(tokens, dtype=np.int64)
        prev = np.empty_like(toks)
        prev[0] = -1 if previous is None else previous
        prev[1:] = toks[:-1]
        return self._kv(toks, np.arange(start, start + len(toks), dtype=np.int64), prev)

    def _kv(self, tokens: np.ndarray, positions: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """K/V of independent slots: token i at positions[i], preceded by previous[i] (-1: none)."""
        g = self.geometry
        out = np.zeros((len(tokens), g.layers, 2, g.heads, g.head_dim), dtype=DTYPE)
        self._encode(0, 0, (previous + 1) & _MASK, out)
        self._encode(0, 1, positions, out)
        self._encode(1, 0, tokens & _MASK, out)
        self._encode(1, 1, positions, out)
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

    def last_token(self, store: KVStore, seq: SequenceKV) -> int:
        return self.token_at(store, seq, seq.length - 1)

    def next_token(self, store: KVStore, seq: SequenceKV) -> int:
        """The next token of one sequence, computed from the cached K/V only."""
        return self.next_tokens(store, [seq])[0]

    def next_tokens(self, store: KVStore, seqs: Sequence[SequenceKV]) -> list[int]:
        """Each sequence's next token: its last cached slot is the query (one batched read each way)."""
        last = store.read_at(*self._slots(seqs, [s.length - 1 for s in seqs]))
        queries = self._decode(1, 0, last).tolist()
        stored_n = (self._decode(0, 1, last) + 1).tolist()  # the position stored in K, not our counter
        targets = []
        for seq, query, n in zip(seqs, queries, stored_n):
            query = _signed(query)
            jump = seq.key != 0 and _mix(seq.key, n) % 5 == 0
            match = seq.index.get(query)
            if match is None or jump or match >= seq.length:
                match = _mix(seq.key, n, query) % max(1, min(n, seq.length))
            targets.append(match)
        return [_signed(v) for v in self._decode(1, 0, store.read_at(*self._slots(seqs, targets))).tolist()]

    def decode_step(
        self, store: KVStore, seqs: Sequence[SequenceKV], tokens: Sequence[int], previous: Sequence[int]
    ) -> list[int]:
        """One decode step for a batch: append tokens[i] (preceded by previous[i]) to sequence i's
        cache, index the K just written, and compute every next token: O(batch) numpy calls, not per sequence."""
        positions = [s.length for s in seqs]
        slots = self._slots(seqs, positions)
        store.write_at(
            *slots,
            self._kv(np.asarray(tokens, np.int64), np.asarray(positions, np.int64), np.asarray(previous, np.int64)),
        )
        keys = self._decode(0, 0, store.read_at(*slots)).tolist()  # read back: the index reflects the cache
        for seq, key, pos in zip(seqs, keys, positions):
            seq.length = pos + 1
            seq.index[_signed(key - 1)] = pos
        return self.next_tokens(store, seqs)

    def _slots(self, seqs: Sequence[SequenceKV], positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        t = self.geometry.tokens_per_block
        blocks = np.fromiter((s.table[p // t] for s, p in zip(seqs, positions)), dtype=np.int64, count=len(seqs))
        return blocks, np.asarray(positions, dtype=np.int64) % t


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 32) if value >= 1 << 31 else value
