"""What an engine's scheduler needs of its model and KV store, and the two ways to back it.

- `real`: the induction model (`tiny_model.py`) over a store of real K/V bytes in shared
  memory (`kv_store.py`): what Triton serves, outputs that prove the cache crossed intact;
- `symbolic`: the same accounting with no K/V at all (`symbolic.py`): what the simulator
  runs, where only the cost model's durations matter.

The scheduler, block pool, leases and pulls are the same code in both: only these two
objects differ, behind the protocols below.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.kv_store import KVStore
from orchestrator.stub_engine.symbolic import SymbolicModel, SymbolicStore
from orchestrator.stub_engine.tiny_model import InductionModel, SequenceKV


class BlockStore(Protocol):
    """An engine's KV blocks as the transfer path sees them."""

    @property
    def shm_name(self) -> str: ...

    @property
    def num_blocks(self) -> int: ...

    def read_blocks(self, blocks: Sequence[int]) -> np.ndarray: ...

    def write_blocks(self, blocks: Sequence[int], shards: np.ndarray) -> None: ...

    def close(self) -> None: ...


class ModelRules(Protocol):
    """The next-token rules over a store (the store is the model's business, not the scheduler's)."""

    def write(self, store: BlockStore, seq: SequenceKV, tokens: Sequence[int], previous: int | None) -> None: ...

    def reindex(self, store: BlockStore, seq: SequenceKV, start: int = 0) -> None: ...

    def next_token(self, store: BlockStore, seq: SequenceKV) -> int: ...

    def decode_step(
        self, store: BlockStore, seqs: Sequence[SequenceKV], tokens: Sequence[int], previous: Sequence[int]
    ) -> list[int]: ...


SYMBOLIC_TOKEN = 1  # what a symbolic engine generates (any id that is not an end id will do)


def backing(name: str, config: EngineConfig, symbolic: bool) -> tuple[ModelRules, BlockStore]:
    """The model and store of engine `name`: real K/V in shared memory, or none."""
    if symbolic:
        return SymbolicModel(SYMBOLIC_TOKEN), SymbolicStore(config.geometry, config.layout, config.num_kv_blocks)
    store = KVStore(config.geometry, config.layout, config.num_kv_blocks, shared=True, label=name)
    return InductionModel(config.geometry), store  # type: ignore[return-value]
