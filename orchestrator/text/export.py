"""The built-in tokenizer as a Hugging Face ``tokenizer.json``, token for token.

Client tools (aiperf, guidellm, transformers) count tokens with a Hugging Face
tokenizer; pointing them at this export makes them count exactly as a server with
``tokenizer_dir: ""`` does.  ``python -m orchestrator.text.export OUT_DIR`` writes
``tokenizer.json`` and ``tokenizer_config.json`` there.

How ``BuiltinTokenizer`` (``orchestrator.text.tokenizer``) maps onto ``tokenizers``:

* normalizer: ``ByteLevel`` turns every UTF-8 byte into one printable character
  (GPT-2's table: a space is ``Ġ``), then a regex ``Replace`` turns each ``Ġ`` that
  is followed by one of the words into ``▁``.  Every space starts a token and only
  spaced word forms are longer than one byte, so this is exactly the spaces the
  built-in encoder makes part of a ``" word"`` token;
* pre-tokenizer: a ``Split`` whose regex is every word form, longest first, then any
  one character.  Oniguruma takes the first alternative that matches, so each piece
  is the longest word form at that position or one byte: the built-in greedy walk;
* model: ``WordLevel`` with the same ids (0..2 ``<pad>`` ``<s>`` ``</s>``, 3..258 the
  bytes, then ``word`` / ``▁word`` pairs); every piece is in the vocabulary;
* decoder: ``Replace`` empties the three specials; ``Metaspace`` (prepend_scheme
  ``first``) turns ``▁`` into a space except in the first token, where it drops it
  (the SentencePiece quirk the built-in decode copies, also after a special, which
  still counts as first); ``ByteLevel`` maps characters back to bytes and decodes
  them with U+FFFD for invalid UTF-8 as Python's ``errors="replace"`` does.

The specials are plain vocabulary entries, not "added tokens": the built-in
tokenizer encodes the text ``"</s>"`` as bytes, and so does this one.  For the same
reason ``tokenizer_config.json`` names no bos/eos/pad token (transformers would add
them as special tokens that split text); readers fall back to ids 2 (eos) and 0
(pad), which are the built-in ones.

One difference: decoding an id outside the vocabulary raises in the built-in
tokenizer and is skipped by ``tokenizers``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from orchestrator.text.tokenizer import BYTE_OFFSET, WORD_OFFSET, WORDS

SPECIALS = ("<pad>", "<s>", "</s>")
SPACE_MARK = "\u2581"  # ▁, SentencePiece's meta symbol: the space of a " word" token


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what ``ByteLevel`` uses), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def builtin_vocab() -> dict[str, int]:
    """Token string -> id, the built-in ids exactly."""
    vocab = {special: i for i, special in enumerate(SPECIALS)}
    vocab.update({char: BYTE_OFFSET + b for b, char in enumerate(byte_chars())})
    for i, word in enumerate(WORDS):
        vocab[word] = WORD_OFFSET + 2 * i
        vocab[SPACE_MARK + word] = WORD_OFFSET + 2 * i + 1
    return vocab


def builtin_hf_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes as ``BuiltinTokenizer``."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError as exc:
        raise ValueError("exporting the tokenizer needs the 'tokenizers' package: pip install tokenizers") from exc
    words = "|".join(sorted(WORDS, key=lambda w: (-len(w), w)))
    forms = sorted([*WORDS, *(SPACE_MARK + w for w in WORDS)], key=lambda f: (-len(f), f))
    space = byte_chars()[ord(" ")]
    tok = Tokenizer(models.WordLevel(builtin_vocab(), unk_token="<unk>"))  # never used: every piece is known
    tok.normalizer = normalizers.Sequence(
        [normalizers.ByteLevel(), normalizers.Replace(Regex(f"{space}(?=(?:{words}))"), SPACE_MARK)]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(forms) + r"|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [
            *(decoders.Replace(special, "") for special in SPECIALS),
            decoders.Metaspace(replacement=SPACE_MARK, prepend_scheme="first"),
            decoders.ByteLevel(),
        ]
    )
    return tok


def export_builtin_tokenizer(out_dir: str) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_path = os.path.join(out_dir, "tokenizer.json")
    builtin_hf_tokenizer().save(tokenizer_path)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return [tokenizer_path, config_path]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m orchestrator.text.export OUT_DIR", file=sys.stderr)
        return 2
    for path in export_builtin_tokenizer(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
