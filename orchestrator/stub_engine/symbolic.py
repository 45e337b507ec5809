"""A model and a KV store that compute and hold no K/V: the engine's bookkeeping alone.

Why: the simulator (`orchestrator.sim`) runs the very scheduler, block accounting, leases
and cost model that serve Triton, over thousands of requests with prompts of thousands
of tokens on many engines. The tiny model's numpy work and a real store of that size per
engine would cost more than everything else together and model nothing the timings need
(the cost model, not host work, gives a step its duration). These two stand in for
`InductionModel` and `KVStore` with the same methods: positions are counted, blocks are
named, nothing is written, and every sequence continues with one fixed token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from orchestrator.stub_engine.kv_layout import DTYPE, Geometry, Layout
from orchestrator.stub_engine.tiny_model import SequenceKV


class SymbolicStore:
    """A KV store of `num_blocks` blocks that keeps no bytes (a read gives zero blocks, in the
    layout's shape, so re-sharding between layouts still runs)."""

    shm_name = ""  # nothing to map: pulls go through the simulator's in-process transport

    def __init__(self, geometry: Geometry, layout: Layout, num_blocks: int) -> None:
        self.geometry, self.layout, self.num_blocks = geometry, layout, num_blocks

    def read_blocks(self, blocks: Sequence[int]) -> np.ndarray:
        return np.zeros(self.layout.shape(self.geometry, 0), dtype=DTYPE)

    def write_blocks(self, blocks: Sequence[int], shards: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class SymbolicModel:
    """Counts the positions each sequence holds; every next token is `token`."""

    def __init__(self, token: int) -> None:
        self.token = token

    def write(self, store: object, seq: SequenceKV, tokens: Sequence[int], previous: int | None) -> None:
        seq.length += len(tokens)

    def reindex(self, store: object, seq: SequenceKV, start: int = 0) -> None:
        pass

    def next_token(self, store: object, seq: SequenceKV) -> int:
        return self.token

    def decode_step(
        self, store: object, seqs: Sequence[SequenceKV], tokens: Sequence[int], previous: Sequence[int]
    ) -> list[int]:
        for seq in seqs:
            seq.length += 1
        return [self.token] * len(seqs)
