"""Preprocessing: the ensemble's text inputs -> the engine contract's token inputs.

Turns `text_input`, `max_tokens`, `bad_words`/`stop_words` (string lists, empty allowed),
`end_id`/`pad_id` (tokenizer defaults) and `min_tokens` (or its alias `min_length`) into
`input_ids`, `input_lengths`, `request_output_len`, `bad_words_list`, `stop_words_list`,
`end_id`, `pad_id`, `min_tokens`. Bad input raises InvalidInput with the fix.

A `stop=true` request (it only names, by its request id, a request to end) skips the
checks: its text and max_tokens are placeholders, so it gets placeholder token inputs.

Knobs (preprocessing config.pbtxt `parameters`): `tokenizer_dir` (empty: the built-in
tokenizer), `max_input_len` (4096 tokens), `max_output_len` (4096: largest `max_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, cast

import numpy as np

from orchestrator.text.tokenizer import Tokenizer
from orchestrator.wire.contract import MAX_WORD_LIST_IDS, Tensors, is_stop_request, scalar
from orchestrator.wire.errors import InvalidInput
from orchestrator.wire.stop_condition import build_word_list

MAX_WORDS = 64  # per list; more is almost surely a client bug


@dataclass(frozen=True, slots=True)
class TextLimits:
    max_input_len: int = 4096
    max_output_len: int = 4096

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "TextLimits":
        values = {}
        for key in ("max_input_len", "max_output_len"):
            if params.get(key, "").strip():
                try:
                    values[key] = int(params[key])
                except ValueError:
                    raise ValueError(
                        f"preprocessing parameter '{key}' must be an integer, got {params[key]!r}"
                    ) from None
                if values[key] < 1:
                    raise ValueError(f"preprocessing parameter '{key}' must be >= 1, got {values[key]}")
        return cls(**values)


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(cast(Any, value)).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8 (byte {exc.start}): send UTF-8 encoded text") from None


def _words(tokenizer: Tokenizer, tensors: Tensors, name: str) -> np.ndarray:
    arr = tensors.get(name)
    words = [] if arr is None else [_text(w, f"'{name}' entry") for w in arr.reshape(-1)]
    words = [w for w in words if w]
    if len(words) > MAX_WORDS:
        raise InvalidInput(f"'{name}' has {len(words)} entries; at most {MAX_WORDS} are accepted")
    flat, offsets = build_word_list([tokenizer.encode(w) for w in words])
    if len(flat) > MAX_WORD_LIST_IDS:
        raise InvalidInput(
            f"'{name}' encodes to {len(flat)} tokens; at most {MAX_WORD_LIST_IDS} are accepted: use shorter words"
        )
    return np.array([flat, offsets], dtype=np.int32).reshape(1, 2, -1)


def _token_id(tokenizer: Tokenizer, tensors: Tensors, name: str, default: int) -> int:
    """A client-chosen special token id: inside the vocabulary, or -1 for none."""
    value = int(scalar(tensors, name, default))
    if value != -1 and not 0 <= value < tokenizer.vocab_size:
        raise InvalidInput(f"'{name}'={value} is not a token id: use -1 or 0..{tokenizer.vocab_size - 1}")
    return value


def _stop_placeholder(tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    empty = np.zeros((1, 2, 0), dtype=np.int32)
    return {
        "input_ids": np.array([[tokenizer.pad_id]], dtype=np.int32),
        "input_lengths": np.array([[1]], dtype=np.int32),
        "request_output_len": np.array([[1]], dtype=np.int32),
        "bad_words_list": empty,
        "stop_words_list": empty,
        "end_id": np.array([[tokenizer.eos_id]], dtype=np.int32),
        "pad_id": np.array([[tokenizer.pad_id]], dtype=np.int32),
        "min_tokens": np.array([[0]], dtype=np.int32),
    }


def preprocess(tokenizer: Tokenizer, tensors: Tensors, limits: TextLimits) -> dict[str, np.ndarray]:
    """One request's ensemble inputs -> engine-contract tensors (batch of one)."""
    if is_stop_request(tensors):
        return _stop_placeholder(tokenizer)
    raw = tensors.get("text_input")
    if raw is None:
        raise InvalidInput("input 'text_input' is required: the prompt as a UTF-8 string")
    if raw.size != 1:
        raise InvalidInput(f"'text_input' must hold one prompt per request, got shape {list(raw.shape)}")
    text = _text(raw.reshape(-1)[0], "'text_input'")
    if not text:
        raise InvalidInput("'text_input' is empty: send a non-empty prompt")
    max_tokens = scalar(tensors, "max_tokens")
    if max_tokens is None:
        raise InvalidInput("input 'max_tokens' is required: the number of tokens to generate")
    if not 1 <= int(max_tokens) <= limits.max_output_len:
        raise InvalidInput(f"'max_tokens' must be between 1 and {limits.max_output_len}, got {int(max_tokens)}")
    ids = tokenizer.encode(text)
    if len(ids) > limits.max_input_len:
        raise InvalidInput(f"prompt is {len(ids)} tokens, more than max_input_len={limits.max_input_len}; shorten it")
    end_id = _token_id(tokenizer, tensors, "end_id", tokenizer.eos_id)
    pad_id = _token_id(tokenizer, tensors, "pad_id", tokenizer.pad_id)
    min_tokens = scalar(tensors, "min_tokens", scalar(tensors, "min_length", 1))
    if int(min_tokens) < 0:
        raise InvalidInput(f"'min_tokens' must be >= 0, got {int(min_tokens)}")
    return {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[int(max_tokens)]], dtype=np.int32),
        "bad_words_list": _words(tokenizer, tensors, "bad_words"),
        "stop_words_list": _words(tokenizer, tensors, "stop_words"),
        "end_id": np.array([[int(end_id)]], dtype=np.int32),
        "pad_id": np.array([[int(pad_id)]], dtype=np.int32),
        "min_tokens": np.array([[int(min_tokens)]], dtype=np.int32),
    }
