"""Stateless streaming detokenization through a small window of token ids.

Problem.  The postprocessing model turns token ids into text once per streamed
response and keeps no state between responses, yet the concatenated deltas must
equal the non-streaming completion byte for byte.  Decoding each response's new
tokens on their own is wrong twice over: a multi-byte UTF-8 character (emoji,
CJK) split across tokens decodes to U+FFFD pieces, and SentencePiece-style
tokenizers drop the leading space of the *first* token they decode
(``decode([▁world]) == "world"``), so every response would lose its space.

Protocol.  The stateful orchestrator (``DetokWindow``) therefore sends, with
every response, the last ``LOOKBACK`` (= 8) already-seen token ids as context,
followed by the new ids.  Wire format, a 1-D ``numpy.int32`` array::

    [n_context, flags, *context_ids, *new_ids]

``flags`` bit 0, ``FINAL`` (1): the request's last response; flush held-back
bytes.  Bit 1, ``PREPEND_PROMPT`` (2): a non-streaming response whose text
should be prompt + completion; the postprocessing model adds the original
``text_input`` itself, this module only reports the flag.  The context starts as
the last ``LOOKBACK`` prompt ids and after every window advances to the last
``LOOKBACK`` ids of context + new, costing O(LOOKBACK + len(new)) per call and
no tokenizer.  ``prompt_window`` is the alternative non-streaming window for a
postprocessing step that cannot see ``text_input``: no context, prompt +
generated ids as new, FINAL, so the text is the whole decoded sequence.

Rendering (``render``).  The text of a window is "what decoding context + new
adds to decoding the context alone", both decoded *together* so the
leading-space convention and split characters look the same on both sides of
the subtraction::

    before = settled(context)          # non-final rule: rendered earlier
    after  = settled(context + new)    # final rule if FINAL
    text   = after[len(before):]       # or after the common prefix, defensively

``settled(ids)`` is ``decode(ids[:j])`` for the largest ``j`` whose decode does
not end in U+FFFD: trailing replacement characters may be the start of a
character whose other bytes are still to come, so they are held back.  A final
window instead returns ``decode(ids[:j]) + decode(ids[j:])``, flushing what is
still held as U+FFFD.  For byte-concatenating decoders (the builtin tokenizer,
byte-level BPE) this equals the plain rule "strip trailing U+FFFD from
``decode(ids)``, unless final"; cutting at a *token* boundary is needed for
SentencePiece byte-fallback decoders (Llama/Mistral-style ``<0xE4>`` tokens),
which turn a whole run of byte tokens into U+FFFD when its end is incomplete,
so the text-level rule would retract characters it already streamed.  The
search looks back at most ``LOOKBACK`` tokens, then falls back to the plain rule.

Alignment.  The context may start inside a character; that fragment decodes to
U+FFFD (and, with byte fallback, poisons its whole run of byte tokens).  So
``render`` first drops up to 3 leading context tokens (a UTF-8 character has at
most 3 continuation bytes), the fewest for which ``settled(window)`` starts
with a real character, always keeping at least one context token so the
new tokens never become "first" and lose their leading space.  The dropped
tokens were rendered by an earlier response, so nothing is lost.

Guarantee.  The non-streaming text is ``completion_text``: one final window over
all generated ids with the same initial context.  Streaming any split of the
same ids into responses yields exactly that text whenever the prompt ids start
at a character boundary (they encode a whole prompt; the window may still cut
into a character once it slides), the generated tokens are valid UTF-8 except
possibly for an incomplete character at the very end,
for decoders that render a token run starting at a character boundary like the
full decode does (byte concatenation, byte-level BPE, byte fallback,
Metaspace).  ``LOOKBACK`` = 8 covers the worst case: 3 dropped continuation
tokens, one complete character and 3 held-back tokens.  Limitation: U+FFFD
that does not come from a split character (invalid bytes emitted by the model,
or a literal U+FFFD) is held back too; a held run longer than the context can
fall out of it, and the stream may then differ from the non-streaming text in
the number of U+FFFD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from orchestrator.text.tokenizer import Tokenizer

LOOKBACK: Final = 8
FINAL: Final = 1
PREPEND_PROMPT: Final = 2
KNOWN_FLAGS: Final = FINAL | PREPEND_PROMPT
HEADER_LEN: Final = 2
REPLACEMENT_CHAR: Final = "\ufffd"
_MAX_ALIGN_SKIP: Final = 3  # continuation bytes of one UTF-8 character
_MAX_HELD: Final = LOOKBACK  # a longer held run cannot survive the window anyway
_INT32_MAX: Final = int(np.iinfo(np.int32).max)

TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]
"""Token ids as a list or a 1-D integer array."""


def _as_ids(ids: TokenIds, what: str) -> npt.NDArray[np.int32]:
    """1-D int32 array of token ids, rejecting what cannot go on the wire."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int32)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D sequence of ints, got {arr.dtype} shape {arr.shape}")
    if int(arr.min()) < 0 or int(arr.max()) > _INT32_MAX:
        raise ValueError(f"{what} must be token ids in [0, {_INT32_MAX}]")
    return arr.astype(np.int32, copy=False)


class DetokWindow:
    """Orchestrator side: per-request context of the last LOOKBACK token ids."""

    __slots__ = ("_context",)

    def __init__(self, prompt_ids: TokenIds) -> None:
        # only the tail is kept (and checked): converting a long prompt whole is wasted per request
        self._context: npt.NDArray[np.int32] = _as_ids(prompt_ids[-LOOKBACK:], "prompt_ids").copy()

    @property
    def context(self) -> tuple[int, ...]:
        """The ids the next window will carry as context (at most LOOKBACK)."""
        return tuple(int(i) for i in self._context)

    def window(self, new_ids: TokenIds, *, final: bool, prepend_prompt: bool = False) -> npt.NDArray[np.int32]:
        """Wire array for one response, then advance the context past new_ids."""
        new = _as_ids(new_ids, "new_ids")
        ctx = self._context
        n_ctx = len(ctx)
        out = np.empty(HEADER_LEN + n_ctx + len(new), dtype=np.int32)
        out[0] = n_ctx
        out[1] = (FINAL if final else 0) | (PREPEND_PROMPT if prepend_prompt else 0)
        out[HEADER_LEN : HEADER_LEN + n_ctx] = ctx
        out[HEADER_LEN + n_ctx :] = new
        self._context = out[HEADER_LEN:][-LOOKBACK:].copy()
        return out


@dataclass(frozen=True, slots=True)
class Rendered:
    """One response's text delta plus the flags the postprocessing model acts on."""

    text: str
    prepend_prompt: bool
    final: bool


def _parse_window(window: npt.NDArray[Any]) -> tuple[int, int, list[int]]:
    """(n_context, flags, context + new ids) of a wire array, or ValueError."""
    arr = np.asarray(window)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"detokenize window must be a 1-D integer array, got {arr.dtype} shape {arr.shape}")
    if len(arr) < HEADER_LEN:
        raise ValueError(f"detokenize window needs [n_context, flags, ...], got length {len(arr)}")
    n_context, flags = int(arr[0]), int(arr[1])
    if not 0 <= n_context <= len(arr) - HEADER_LEN:
        raise ValueError(f"detokenize window n_context={n_context} outside [0, {len(arr) - HEADER_LEN}]")
    if flags < 0 or flags & ~KNOWN_FLAGS:
        raise ValueError(f"detokenize window has unknown flag bits: {flags}")
    ids = arr[HEADER_LEN:]
    if len(ids) and int(ids.min()) < 0:
        raise ValueError("detokenize window contains negative token ids")
    return n_context, flags, ids.tolist()


def _settled(tokenizer: Tokenizer, ids: list[int], *, final: bool) -> str:
    """Decode, holding back (or, if final, flushing) a trailing unfinished run."""
    text = tokenizer.decode(ids)
    if not text.endswith(REPLACEMENT_CHAR):
        return text
    for j in range(len(ids) - 1, max(0, len(ids) - _MAX_HELD) - 1, -1):
        head = tokenizer.decode(ids[:j])
        if not head.endswith(REPLACEMENT_CHAR):
            return head + tokenizer.decode(ids[j:]) if final else head
    return text if final else text.rstrip(REPLACEMENT_CHAR)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def render(tokenizer: Tokenizer, window: npt.NDArray[Any]) -> Rendered:
    """Postprocessing side: the text this window adds to the stream."""
    n_context, flags, ids = _parse_window(window)
    final = bool(flags & FINAL)
    skip, after = 0, _settled(tokenizer, ids, final=final)
    if not after or after.startswith(REPLACEMENT_CHAR):
        for i in range(1, min(_MAX_ALIGN_SKIP, n_context - 1) + 1):
            candidate = _settled(tokenizer, ids[i:], final=final)
            if candidate and not candidate.startswith(REPLACEMENT_CHAR):
                skip, after = i, candidate
                break
    before = _settled(tokenizer, ids[skip:n_context], final=False) if n_context else ""
    if after.startswith(before):
        text = after[len(before) :]
    else:
        text = after[_common_prefix_len(before, after) :]
    return Rendered(text=text, prepend_prompt=bool(flags & PREPEND_PROMPT), final=final)


def prompt_window(prompt_ids: TokenIds, generated_ids: TokenIds) -> npt.NDArray[np.int32]:
    """Non-streaming window whose text is prompt + completion, both decoded.

    No context, every id new and FINAL, so ``render`` returns
    ``decode(prompt + generated)``, the prompt as the tokenizer renders it (what
    TensorRT-LLM's postprocessing returns), for a postprocessing step that cannot
    see ``text_input``.  PREPEND_PROMPT is not set: the text is already whole.
    """
    ids = np.concatenate([_as_ids(prompt_ids, "prompt_ids"), _as_ids(generated_ids, "generated_ids")])
    return DetokWindow(()).window(ids, final=True)


def completion_text(
    tokenizer: Tokenizer,
    prompt_ids: TokenIds,
    generated_ids: TokenIds,
) -> str:
    """Non-streaming text: one final window over all generated ids."""
    return render(tokenizer, DetokWindow(prompt_ids).window(generated_ids, final=True)).text
