"""A deterministic next-token model whose state plays the part of the KV cache.

Why this model: tests need an oracle. Each next token is computed only from the
sequence's state (the tokens seen so far and an index of where each token last
occurred), so a generation engine that receives a wrong or truncated state produces
different tokens, and the aggregated and disaggregated paths agree only if the state
crossed intact.

The rule is an "induction head": the next token is the one that followed the previous
occurrence of the current token; with no previous occurrence (or, when sampling, at
positions picked by a hash of the sampling key) it jumps to a hashed position of the
history. It continues prompts by copying runs of them, so its output is readable text
that splits multi-byte characters across tokens exactly as real byte-level models do.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

_MASK = 0xFFFFFFFF


def _mix(*values: int) -> int:
    """A small, fixed integer hash (Python's hash() of ints is stable, but be explicit)."""
    h = 0x811C9DC5
    for v in values:
        h = ((h ^ (v & _MASK)) * 0x01000193) & _MASK
        h ^= h >> 15
    return h


@dataclass(slots=True)
class SequenceState:
    """The model's per-sequence state: every token so far and where each token last occurred."""

    tokens: list[int]
    key: int
    last_pos: dict[int, int] = field(default_factory=dict)

    def append(self, token: int) -> None:
        self.last_pos[self.tokens[-1]] = len(self.tokens) - 1
        self.tokens.append(token)


class InductionModel:
    """Stateless rules over a SequenceState; one instance serves every sequence."""

    def prefill(self, tokens: Sequence[int], key: int) -> SequenceState:
        state = SequenceState(tokens=[int(tokens[0])], key=key)
        for token in tokens[1:]:
            state.append(int(token))
        return state

    def next_token(self, state: SequenceState) -> int:
        tokens = state.tokens
        n = len(tokens)
        jump = state.key != 0 and _mix(state.key, n) % 5 == 0
        previous = state.last_pos.get(tokens[-1])
        if previous is not None and not jump:
            return tokens[previous + 1]
        return tokens[_mix(state.key, n, tokens[-1]) % n]

    @staticmethod
    def export_state(state: SequenceState) -> bytes:
        """Serialise a state: the tokens are the 'KV', the index is rebuilt on import."""
        return struct.pack(f"<II{len(state.tokens)}i", state.key, len(state.tokens), *state.tokens)

    def import_state(self, data: bytes) -> SequenceState:
        if len(data) < 8:
            raise ValueError(f"state blob of {len(data)} bytes is shorter than its 8-byte header")
        key, n = struct.unpack_from("<II", data)
        if len(data) != 8 + 4 * n or n == 0:
            raise ValueError(f"state blob of {len(data)} bytes does not hold {n} tokens")
        return self.prefill(struct.unpack_from(f"<{n}i", data, 8), key)
