"""When a generated sequence is finished: max tokens, end id, or a stop word.

One implementation serves both sides: the stub engine uses it to stop, and the
orchestrator uses it to recognise an engine's last response as it arrives, so that the
final flag rides on the last tokens instead of costing a separate empty response.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence


class FinishReason(str, Enum):
    LENGTH = "length"
    END_ID = "end_id"
    STOP_WORD = "stop_word"


@dataclass(frozen=True, slots=True)
class StopCondition:
    """Stops after `max_new_tokens`, before an `end_id` token, or after a stop sequence."""

    max_new_tokens: int
    end_id: int | None = None
    stop_words: tuple[tuple[int, ...], ...] = ()

    def is_end(self, token: int) -> bool:
        """An end token ends the sequence and is not part of the output (TensorRT-LLM's rule)."""
        return self.end_id is not None and token == self.end_id

    def finished(self, generated: Sequence[int]) -> FinishReason | None:
        """Why `generated` (end token excluded) is complete, or None if it may go on."""
        if len(generated) >= self.max_new_tokens:
            return FinishReason.LENGTH
        for word in self.stop_words:
            n = len(word)
            if n and len(generated) >= n and tuple(generated[-n:]) == word:
                return FinishReason.STOP_WORD
        return None


def parse_word_list(flat: Sequence[int], offsets: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Decode TensorRT-LLM's [2, N] word-list layout: ids row and cumulative end offsets row.

    The offsets row is padded with -1 after the last word; an empty list arrives as [2, 0].
    """
    words: list[tuple[int, ...]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end < start or end > len(flat):
            raise ValueError(f"word list offsets are not increasing within {len(flat)} ids: {list(offsets)}")
        words.append(tuple(int(t) for t in flat[start:end]))
        start = end
    return tuple(w for w in words if w)


def build_word_list(words: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Inverse of parse_word_list: (ids row, offsets row), both of equal length (padded)."""
    flat: list[int] = []
    offsets: list[int] = []
    for word in words:
        flat.extend(int(t) for t in word)
        offsets.append(len(flat))
    width = max(len(flat), len(offsets))
    return flat + [0] * (width - len(flat)), offsets + [-1] * (width - len(offsets))
