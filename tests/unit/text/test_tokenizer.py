"""Tests for orchestrator.text.tokenizer: builtin vocabulary, round trip, the
SentencePiece leading-space trap, and the HuggingFace loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.text.tokenizer import (
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    WORD_OFFSET,
    WORDS,
    BuiltinTokenizer,
    HuggingFaceTokenizer,
    Tokenizer,
    load_tokenizer,
)

TOK = BuiltinTokenizer()
HELLO = 649  # bare "hello": 259 + 2 * WORDS.index("hello")
SP_WORLD = 648  # " world": 260 + 2 * WORDS.index("world")
SP_THERE = 336  # " there"


def spaced(word: str) -> int:
    return WORD_OFFSET + 2 * WORDS.index(word) + 1


def test_vocabulary_layout() -> None:
    assert isinstance(TOK, Tokenizer)
    assert (TOK.pad_id, TOK.eos_id, TOK.name) == (0, 2, "builtin")
    assert TOK.vocab_size == 259 + 2 * len(WORDS)
    assert 150 <= len(WORDS) <= 250
    assert WORDS.index("hello") == 195 and WORDS.index("world") == 194


def test_exact_ids_for_known_text() -> None:
    assert TOK.encode("hello world!") == [HELLO, SP_WORLD, 36]
    assert TOK.encode("hi") == [107, 108]  # no word "hi": single bytes
    assert TOK.encode("é") == [BYTE_OFFSET + 0xC3, BYTE_OFFSET + 0xA9]
    assert TOK.encode("") == []


def test_greedy_longest_match() -> None:
    assert TOK.encode(" there") == [SP_THERE]
    assert TOK.encode(" theory")[0] == spaced("the")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world, the quick brown fox!",
        "plain ascii with CAPS and digits 0123 \t\n",
        "héllo wörld 你好 🎉👍🏽",
        "🎉",
        "\x00\x7f\u0080\uffff\U0010ffff",
        "the",
        "  the",  # two spaces: first token is a bare space byte, round trip holds
    ],
)
def test_round_trip(text: str) -> None:
    assert TOK.decode(TOK.encode(text)) == text


def test_encode_is_deterministic() -> None:
    text = "héllo wörld 你好 🎉👍🏽 the world"
    assert TOK.encode(text) == TOK.encode(text)


def _expected_round_trip(text: str) -> str:
    """The documented exception: a leading " word" prefix loses its space."""
    return text[1:] if any(text.startswith(" " + w) for w in WORDS) else text


_PIECES = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(WORDS).map(lambda w: " " + w),
    st.sampled_from([" ", "🎉", "👍🏽", "你好", "é", ".", "\n"]),
    st.text(max_size=4),
)


@settings(derandomize=True, database=None, max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_round_trip_property(text: str) -> None:
    ids = TOK.encode(text)
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == _expected_round_trip(text)


def test_leading_space_dropped_on_first_word_token_only() -> None:
    assert TOK.decode([SP_WORLD]) == "world"
    assert TOK.decode([HELLO, SP_WORLD]) == "hello world"
    assert TOK.decode([SP_WORLD, SP_WORLD]) == "world world"
    assert TOK.decode(TOK.encode(" the end")) == "the end"
    assert TOK.decode([BYTE_OFFSET + ord(" ")]) == " "  # a space byte is not a word


def test_per_token_decode_loses_spaces() -> None:
    text = "the quick brown fox"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert "".join(TOK.decode([i]) for i in ids) == "thequickbrownfox"


def test_decode_is_raw() -> None:
    assert TOK.decode([PAD_ID, 1, EOS_ID]) == ""
    assert TOK.decode([HELLO, EOS_ID]) == "hello"
    assert TOK.decode(TOK.encode("🎉")[:2]) == "\ufffd"
    assert TOK.decode(TOK.encode("x  ")) == "x  "  # no trimming


@pytest.mark.parametrize("bad", [-1, 659, 10**6])
def test_decode_rejects_unknown_ids(bad: int) -> None:
    with pytest.raises(ValueError, match="outside vocabulary"):
        TOK.decode([HELLO, bad])


@pytest.mark.parametrize("spec", [None, "", "builtin"])
def test_load_builtin(spec: str | None) -> None:
    assert isinstance(load_tokenizer(spec), BuiltinTokenizer)


def test_load_missing_dir_names_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(missing)


def test_load_dir_without_tokenizer_json_names_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path))


def _write_word_level(directory: Path) -> None:
    """A hand-made WordLevel tokenizer.json (no training, no download)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "hello": 4, "world": 5}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))


def test_hf_ids_from_config(tmp_path: Path) -> None:
    _write_word_level(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"})
    )
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (3, 0, 6)
    assert tok.encode("hello world") == [4, 5]
    assert tok.decode([2, 4, 5, 3]) == "hello world"  # specials skipped


def test_hf_ids_fall_back_to_arguments(tmp_path: Path) -> None:
    _write_word_level(tmp_path)
    default = HuggingFaceTokenizer(str(tmp_path))
    assert (default.eos_id, default.pad_id) == (2, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    tok = HuggingFaceTokenizer(str(tmp_path), eos_id=7, pad_id=9)
    assert (tok.eos_id, tok.pad_id) == (7, 9)
