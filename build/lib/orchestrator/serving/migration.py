"""Request migration: continuing a streaming request on other engines after its generation
engine failed with tokens already sent to the client.

The continuation is a fresh request over the same client request: its prompt is the
original prompt plus every token generated so far, its budget what is left of
`max_tokens`, and everything else (sampling inputs, seed, end id, stop words) unchanged.
It runs a context phase and a generation phase like any request; its first token is the
next token of the client's stream.

Why that is exact (the stub engines; a real engine's sampler must be seeded per position
for the same to hold): the next token depends only on the token sequence so far, the
absolute positions (held in each position's K/V) and the sampling key (temperature, top_k,
top_p, seed), so a prefill of prompt + generated rebuilds the cache the failed engine had
and continues it token for token. What depends on the request's own history stays with
the orchestrator, which keeps the client's request as it was: `max_tokens` and stop words
are judged on all generated tokens (a stop word that straddles the cut is found there, not
by the engine), `num_output_tokens` and the perf outputs count from the client's arrival,
`exclude_input_in_output` applies to the original prompt, and the detokenization window
continues the same stream. `min_tokens` is lowered by what was already generated.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from orchestrator.wire.contract import EngineRequest

Tensors = Mapping[str, np.ndarray]


def continuation_tensors(tensors: Tensors, request: EngineRequest, generated: Sequence[int]) -> dict[str, np.ndarray]:
    """The inputs of a continuation: prompt + `generated` as its prompt, the rest of the
    budget as `request_output_len`, `min_tokens` less what is already generated."""
    if len(generated) >= request.stop.max_new_tokens:
        raise ValueError(
            f"nothing left to continue: {len(generated)} of max_tokens={request.stop.max_new_tokens} generated"
        )
    ids = request.input_ids + tuple(generated)
    out = dict(tensors)
    out["input_ids"] = np.asarray(ids, dtype=tensors["input_ids"].dtype).reshape(1, -1)
    length_dtype = tensors["input_lengths"].dtype if "input_lengths" in tensors else np.int32
    out["input_lengths"] = np.array([[len(ids)]], dtype=length_dtype)
    out_len_dtype = tensors["request_output_len"].dtype if "request_output_len" in tensors else np.int32
    out["request_output_len"] = np.array([[request.stop.max_new_tokens - len(generated)]], dtype=out_len_dtype)
    if "min_tokens" in tensors:
        left = max(0, request.sampling.min_tokens - len(generated))
        out["min_tokens"] = np.array([[left]], dtype=tensors["min_tokens"].dtype)
    return out


def budget_spent(left_behind: Sequence[str], limit: int) -> str:
    """What the client's error adds when no migration is left (none allowed: the old wording)."""
    if limit == 0:
        return " (after tokens were streamed: not retried)"
    times = f"{len(left_behind)} time{'s' if len(left_behind) != 1 else ''}"
    return (
        f" (after tokens were streamed: migrated {times}, from {', '.join(left_behind)}; max_migrations={limit} spent)"
    )


def migration_failed(number: int, limit: int, why: str) -> str:
    """What the client's error adds when a migration itself could not continue the request."""
    return f" (after tokens were streamed: migration {number} of max_migrations={limit} failed: {why})"
