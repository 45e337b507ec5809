"""Where a block's K/V values live: the model geometry and a simulated parallel layout.

Canonical block layout (what the model reads and writes), per block:

    [layers, 2 (K, V), heads, tokens_per_block, head_dim]   float32

An engine declares `tensor_parallel_size` (tp) and `pipeline_parallel_size` (pp). As on
real GPUs, each of its tp*pp ranks holds only its own shard of every block: pipeline rank
i the layers [i*L/pp, (i+1)*L/pp), tensor rank j the heads [j*H/tp, (j+1)*H/tp). The
engine's storage is one array with the rank first:

    [tp*pp, num_blocks, layers/pp, 2, heads/tp, tokens_per_block, head_dim]   (rank = pp_rank*tp + tp_rank)

so the bytes differ between layouts (with tp > 1 even within one block; with pp alone
once a transfer holds more than one block). A transfer ships blocks in the source's
layout; the receiver rebuilds canonical blocks (`gather`) and re-shards them into its own
(`scatter`). Skipping that conversion scrambles heads or layers and changes the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class Geometry:
    """The stub model's shape; both sides of a transfer must agree on it."""

    layers: int = 4
    heads: int = 8  # Llama-3.1-8B's KV heads: tensor_parallel_size up to 8 divides them
    head_dim: int = 2
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "tokens_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * np.dtype(DTYPE).itemsize

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)


@dataclass(frozen=True, slots=True)
class Layout:
    """A simulated tensor/pipeline-parallel split of every block (see module docstring)."""

    tp: int = 1
    pp: int = 1

    def validate(self, geometry: Geometry) -> None:
        if self.tp < 1 or geometry.heads % self.tp:
            raise ValueError(f"tensor_parallel_size={self.tp} must divide the model's {geometry.heads} heads")
        if self.pp < 1 or geometry.layers % self.pp:
            raise ValueError(f"pipeline_parallel_size={self.pp} must divide the model's {geometry.layers} layers")

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    def shape(self, g: Geometry, num_blocks: int) -> tuple[int, ...]:
        """Storage shape for `num_blocks` blocks in this layout."""
        return (self.ranks, num_blocks, g.layers // self.pp, 2, g.heads // self.tp, g.tokens_per_block, g.head_dim)

    def scatter(self, g: Geometry, canonical: np.ndarray) -> np.ndarray:
        """[n, L, 2, H, T, D] canonical blocks -> [ranks, n, L/pp, 2, H/tp, T, D] shards."""
        n, t = canonical.shape[0], canonical.shape[4]  # t: tokens per block, or 1 for single slots
        x = canonical.reshape(n, self.pp, g.layers // self.pp, 2, self.tp, g.heads // self.tp, t, g.head_dim)
        x = x.transpose(1, 4, 0, 2, 3, 5, 6, 7)  # pp, tp, n, Lr, 2, Hr, T, D
        return np.ascontiguousarray(x).reshape(self.ranks, n, g.layers // self.pp, 2, g.heads // self.tp, t, g.head_dim)

    def gather(self, g: Geometry, shards: np.ndarray) -> np.ndarray:
        """Inverse of `scatter`: [ranks, n, L/pp, 2, H/tp, T, D] -> [n, L, 2, H, T, D]."""
        n, t = shards.shape[1], shards.shape[5]
        x = shards.reshape(self.pp, self.tp, n, g.layers // self.pp, 2, g.heads // self.tp, t, g.head_dim)
        x = x.transpose(2, 0, 3, 4, 1, 5, 6, 7)  # n, pp, Lr, 2, tp, Hr, T, D
        return np.ascontiguousarray(x).reshape(n, g.layers, 2, g.heads, t, g.head_dim)


def convert(g: Geometry, source: Layout, target: Layout, shards: np.ndarray) -> np.ndarray:
    """Re-shard blocks from `source`'s layout to `target`'s (a copy only when they differ)."""
    if source == target:
        return shards
    return target.scatter(g, source.gather(g, shards))
