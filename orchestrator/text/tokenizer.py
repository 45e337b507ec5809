"""Tokenizers for the serving pipeline: one protocol, two implementations.

``Tokenizer`` is the small surface the orchestrator and the pre/postprocessing
models need: ``encode``, a *raw* ``decode`` and a few ids.  ``decode`` is raw on
purpose: it never trims whitespace and turns invalid or incomplete UTF-8 into
U+FFFD (``errors="replace"``), because the streaming detokenizer
(``orchestrator.text.detokenize``) reasons about exactly those two effects and would
be fooled by any cleanup.  Special tokens decode to nothing.  ``encode`` returns
only the tokens of the text (no BOS/EOS is added), for both implementations.

``BuiltinTokenizer`` needs no download, so the whole pipeline and its tests run
offline.  Its vocabulary:

* ids 0, 1, 2 are pad, bos and eos (special, decode to nothing);
* ids 3..258 are the single bytes 0..255 (id = byte + 3), so *every* string
  can be encoded and multi-byte characters (CJK, emoji) are split across
  tokens, exactly the case that breaks naive per-token streaming;
* ids 259.. are word tokens: for ``WORDS[i]`` the bare form ``"word"`` has id
  ``259 + 2*i`` and the leading-space form ``" word"`` (``"▁word"`` in
  SentencePiece notation) has id ``260 + 2*i``.

Encoding takes the UTF-8 bytes of the text and repeatedly emits the longest
word form (found by walking a byte trie) that starts at the current position,
or else the single byte there.  It is deterministic.

Decoding concatenates the tokens' bytes and decodes them with
``errors="replace"``.  It deliberately copies the SentencePiece convention that
trips up streaming: when the *first* id passed is a leading-space word token,
that one leading space is dropped (``decode([▁world]) == "world"`` but
``decode([hello, ▁world]) == "hello world"``), so per-token decoding loses
spaces and the streaming code is tested against the trap.

Round trip, exactly: for every ``str`` ``t`` without lone surrogates,
``decode(encode(t)) == t[1:]`` if ``t`` starts with a space immediately
followed by the letters of some word in ``WORDS`` (as a prefix: ``" theory"``
counts, via ``" the"``), and ``== t`` otherwise.  (Greedy matching guarantees
the first token is then a leading-space word form, since only those start with
a space and are longer than one byte.)

``HuggingFaceTokenizer`` wraps a local ``tokenizer.json`` via the
``tokenizers`` package, imported lazily so the package is optional.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

PAD_ID: Final = 0
BOS_ID: Final = 1
EOS_ID: Final = 2
BYTE_OFFSET: Final = 3
WORD_OFFSET: Final = BYTE_OFFSET + 256

# fmt: off
WORDS: Final[tuple[str, ...]] = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he",
    "was", "for", "on", "are", "as", "with", "his", "they", "at", "be",
    "this", "have", "from", "or", "one", "had", "by", "word", "but", "not",
    "what", "all", "were", "we", "when", "your", "can", "said", "there", "use",
    "an", "each", "which", "she", "do", "how", "their", "if", "will", "up",
    "other", "about", "out", "many", "then", "them", "these", "so", "some", "her",
    "would", "make", "like", "him", "into", "time", "has", "look", "two", "more",
    "write", "go", "see", "number", "no", "way", "could", "people", "my", "than",
    "first", "water", "been", "call", "who", "its", "now", "find", "long", "down",
    "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound",
    "take", "only", "little", "work", "know", "place", "year", "live", "me", "back",
    "give", "most", "very", "after", "thing", "our", "just", "name", "good", "sentence",
    "man", "think", "say", "great", "where", "help", "through", "much", "before", "line",
    "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came",
    "want", "show", "also", "around", "form", "three", "small", "set", "put", "end",
    "does", "another", "well", "large", "must", "big", "even", "such", "because", "turn",
    "here", "why", "ask", "went", "men", "read", "need", "land", "different", "home",
    "us", "move", "try", "kind", "hand", "picture", "again", "change", "off", "play",
    "air", "away", "animal", "house", "point", "page", "letter", "mother", "answer", "found",
    "study", "still", "learn", "should", "world", "hello", "quick", "brown", "fox", "lazy",
)
# fmt: on


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer; decode is raw (see module doc)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def name(self) -> str: ...


def _build_vocab() -> tuple[tuple[bytes, ...], list[dict[int, int]], list[int]]:
    """Token bytes by id plus a byte trie (children per node, terminal id per node)."""
    if len(set(WORDS)) != len(WORDS) or not all(
        w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in WORDS
    ):
        raise AssertionError("WORDS must be unique lowercase ASCII words of 2+ letters")
    pieces: list[bytes] = [b"", b"", b""]
    pieces += [bytes([b]) for b in range(256)]
    for word in WORDS:
        pieces += [word.encode(), b" " + word.encode()]
    children: list[dict[int, int]] = [{}]
    terminal: list[int] = [-1]
    for token_id in range(WORD_OFFSET, len(pieces)):
        node = 0
        for byte in pieces[token_id]:
            nxt = children[node].get(byte)
            if nxt is None:
                nxt = len(children)
                children[node][byte] = nxt
                children.append({})
                terminal.append(-1)
            node = nxt
        terminal[node] = token_id
    return tuple(pieces), children, terminal


_PIECES, _TRIE_CHILDREN, _TRIE_TERMINAL = _build_vocab()


def _is_spaced_word(token_id: int) -> bool:
    return token_id >= WORD_OFFSET and (token_id - WORD_OFFSET) % 2 == 1


class BuiltinTokenizer:
    """Offline byte + word tokenizer with the SentencePiece leading-space quirk."""

    __slots__ = ()

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def vocab_size(self) -> int:
        return len(_PIECES)

    @property
    def name(self) -> str:
        return "builtin"

    def encode(self, text: str) -> list[int]:
        """Greedy longest word match over the UTF-8 bytes, else single bytes."""
        data = text.encode("utf-8")
        children, terminal = _TRIE_CHILDREN, _TRIE_TERMINAL
        ids: list[int] = []
        pos, n = 0, len(data)
        while pos < n:
            best_id, best_end = BYTE_OFFSET + data[pos], pos + 1
            node, i = 0, pos
            while i < n:
                nxt = children[node].get(data[i])
                if nxt is None:
                    break
                node, i = nxt, i + 1
                if terminal[node] >= 0:
                    best_id, best_end = terminal[node], i
            ids.append(best_id)
            pos = best_end
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Concatenate bytes; a leading-space word as first id loses its space."""
        pieces, size = _PIECES, len(_PIECES)
        out = bytearray()
        first = True
        for raw in ids:
            token_id = operator.index(raw)
            if not 0 <= token_id < size:
                raise ValueError(f"token id {token_id} outside vocabulary of size {size}")
            piece = pieces[token_id]
            if first and _is_spaced_word(token_id):
                piece = piece[1:]
            first = False
            out += piece
        return out.decode("utf-8", errors="replace")


def read_tokenizer_config(path: str) -> Mapping[str, Any]:
    """A tokenizer folder's tokenizer_config.json: optional ({} when absent); a present but
    broken one is a deployment error (ValueError)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read tokenizer config {path!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer config {path!r} is not a JSON object")
    return config


def token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a str or {"content": str}."""
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, Mapping) else None
    return content if isinstance(content, str) else None


class HuggingFaceTokenizer:
    """A local tokenizer.json through the optional ``tokenizers`` package."""

    __slots__ = ("_eos_id", "_name", "_pad_id", "_tok")

    def __init__(self, tokenizer_dir: str, *, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> None:
        if not os.path.isdir(tokenizer_dir):
            raise ValueError(f"tokenizer directory does not exist: {tokenizer_dir!r}")
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file does not exist: {path!r}")
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:
            raise ValueError("HuggingFace tokenizers need the 'tokenizers' package: pip install tokenizers") from exc
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot load tokenizer file {path!r}: {exc}") from exc
        config = read_tokenizer_config(os.path.join(tokenizer_dir, "tokenizer_config.json"))
        self._eos_id = self._resolve(config.get("eos_token"), eos_id)
        self._pad_id = self._resolve(config.get("pad_token"), pad_id)
        self._name = "hf:" + os.path.basename(os.path.normpath(tokenizer_dir))

    def _resolve(self, value: Any, fallback: int) -> int:
        content = token_content(value)
        token_id = self._tok.token_to_id(content) if content is not None else None
        return fallback if token_id is None else int(token_id)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        """Text tokens only; no BOS/EOS, matching BuiltinTokenizer."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Raw decode: specials skipped, no cleanup of tokenization spaces."""
        return str(self._tok.decode([operator.index(i) for i in ids], skip_special_tokens=True))


def load_tokenizer(tokenizer_dir: str | None) -> Tokenizer:
    """Builtin for None, "" or "builtin"; otherwise a HuggingFace directory."""
    if tokenizer_dir is None or tokenizer_dir in ("", "builtin"):
        return BuiltinTokenizer()
    return HuggingFaceTokenizer(tokenizer_dir)
