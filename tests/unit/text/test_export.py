"""Tests for orchestrator.text.export: the exported tokenizer.json encodes and decodes
exactly as BuiltinTokenizer, through `tokenizers` and through HuggingFaceTokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orchestrator.text.export import SPACE_MARK, main
from orchestrator.text.tokenizer import WORDS, BuiltinTokenizer, HuggingFaceTokenizer

tokenizers = pytest.importorskip("tokenizers")

PROMPTS = [
    "",
    "hello world",
    " hello  world",  # a leading-space word first: decode drops that space, in both
    "  the",
    " theory of another other",  # words as prefixes of longer letter runs
    "Hello, World! The END.",
    "the quick brown fox jumps over the lazy dog\n\tand then some",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 sequences",
    "中文 日本語 한국어 你好，世界",
    "\x00\x01\r\n\x7f ÿ é à ü",
    "<s> </s> <pad> <unk>",  # specials' spellings are plain text, as in the built-in tokenizer
    f"{SPACE_MARK}the Ġthe {SPACE_MARK}",  # the marks the export uses inside
    " " + " ".join(WORDS),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("builtin-tokenizer")
    assert main([str(out)]) == 0
    return out


def random_prompts(n: int) -> list[str]:
    rng = random.Random(19)
    alphabet = [*" abcdefghijklmnopqrstuvwxyz" * 3, *"ABZ09.,!?\n\t😀你é<>/", SPACE_MARK, "Ġ"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_files_and_config(exported: Path) -> None:
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"bos_token", "eos_token", "pad_token"} & set(config)  # they would become added tokens
    assert json.loads((exported / "tokenizer.json").read_text())["added_tokens"] == []


def test_encodes_and_decodes_like_the_builtin(exported: Path) -> None:
    hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    builtin = BuiltinTokenizer()
    assert hf.get_vocab_size(with_added_tokens=True) == builtin.vocab_size
    for text in PROMPTS + random_prompts(500):
        ids = builtin.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids) == builtin.decode(ids), text


def test_raw_decode_of_any_ids_matches(exported: Path) -> None:
    """Split UTF-8 (U+FFFD per maximal invalid run), specials, a spaced word after a special."""
    hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    builtin = BuiltinTokenizer()
    rng = random.Random(3)
    awkward = [0, 1, 2, 3 + 0x20, 3 + 0xE4, 3 + 0xBD, 3 + 0xA0, 3 + 0xF0, 3 + 0x9F, 3 + 0x80, 3 + 0xFF, 259, 260, 262]
    cases = [[1, 260], [260], [260, 260], [3 + 0x20, 260], [3 + 0xE4, 3 + 0xBD], [3 + 0xE4, 260, 3 + 0xA0]]
    cases += [[rng.choice(awkward) for _ in range(rng.randint(0, 8))] for _ in range(2000)]
    cases += [[rng.randrange(builtin.vocab_size) for _ in range(rng.randint(0, 8))] for _ in range(2000)]
    for ids in cases:
        assert hf.decode(ids, skip_special_tokens=True) == builtin.decode(ids), ids
        assert hf.decode(ids, skip_special_tokens=False) == builtin.decode(ids), ids


def test_the_server_loader_reads_it_as_the_builtin(exported: Path) -> None:
    hf = HuggingFaceTokenizer(str(exported))
    builtin = BuiltinTokenizer()
    assert (hf.eos_id, hf.pad_id, hf.vocab_size) == (builtin.eos_id, builtin.pad_id, builtin.vocab_size)
    for text in PROMPTS:
        assert hf.encode(text) == builtin.encode(text)
        assert hf.decode(hf.encode(text)) == builtin.decode(builtin.encode(text))


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
