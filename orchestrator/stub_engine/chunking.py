"""Chunked context (TensorRT-LLM's `enable_chunked_context`): a prompt's prefill over several steps.

Why: without it a prompt's whole uncached prefill runs in the step that admits it, and
every running sequence's next token waits for that step (an 8192-token prompt holds every
decode for its whole prefill: a TPOT spike). With it a step computes at most what its
token budget allows of each prompt, and the running sequences decode in every one of
those steps.

The rules, TensorRT-LLM's first-come-first-served chunking:
- a step's budget is `max_num_tokens` less one token per decoding sequence (and per
  generation_only sequence joining with pulled KV);
- prompts already part-way through their prefill continue first, in admission order;
  then queued prompts may start with a first chunk, if budget, batch slots and KV blocks
  allow (blocks for the whole request are taken at admission, as without chunking);
- each prompt gets all it has left if that fits the budget left (its last chunk, of any
  length), else the most whole blocks (`tokens_per_block`, the chunk unit) that fit; one
  that gets nothing waits for the next step, a later one may still finish in what is left.

Why apart from the scheduler (`core.py`): this arithmetic, and which sequence continues
with how much, is the one part of a step that differs with chunking on; here `core.py`
reads the same either way. The chunk's model work is `model_work.prefill`: it writes
exactly the chunk's K/V and registers in the prefix cache only blocks already written,
so a prompt sharing a prefix with a half-prefilled one never reuses unwritten blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.stub_engine.sequence import EngineSequence


@dataclass(slots=True, eq=False)
class Chunk:
    """The part of one prompt's prefill a step computes."""

    seq: EngineSequence
    tokens: int  # prompt tokens this step writes (0: the prompt was cached whole)
    last: bool  # the prompt is complete after it: the step computes the first token

    @property
    def cost(self) -> int:
        """Tokens of the step's budget it takes (a cached prompt still computes its first token)."""
        return max(1, self.tokens)


def next_chunk(seq: EngineSequence, left: int, budget: int, unit: int, chunked: bool) -> Chunk | None:
    """The chunk of a prompt with `left` tokens to prefill in a step with `budget` tokens
    left: the rest if it fits, else (chunking) the most whole units that fit; None: none now."""
    if max(1, left) <= budget:
        return Chunk(seq, left, last=True)
    take = budget // unit * unit if chunked else 0
    return Chunk(seq, take, last=False) if take > 0 else None


def left_to_prefill(seq: EngineSequence) -> int:
    """Prompt tokens of an admitted sequence whose K/V is neither cached nor written yet."""
    assert seq.alloc is not None and seq.kv is not None
    return seq.prompt_tokens - max(seq.alloc.cached_tokens, seq.kv.length)


def continuing(prefilling: list[EngineSequence], budget: int, unit: int) -> list[Chunk]:
    """The next chunk of each prompt part-way through its prefill, in admission order, while
    the budget lasts."""
    chunks: list[Chunk] = []
    for seq in prefilling:
        if seq.done:
            continue
        chunk = next_chunk(seq, left_to_prefill(seq), budget, unit, chunked=True)
        if chunk is not None:
            chunks.append(chunk)
            budget -= chunk.cost
    return chunks
