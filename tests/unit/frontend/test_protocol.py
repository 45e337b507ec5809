"""OpenAI request validation, stop strings and chunk shapes, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.frontend.ensemble import TritonError, classify, ensemble_values
from orchestrator.frontend.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    OpenAIError,
    StopMatcher,
    chunk,
    finish_reason,
    full_body,
    parse_request,
    sse,
    usage,
)


def parse(body: dict[str, Any], kind: Any = "completion") -> Any:
    return parse_request(body, kind, served_model="disagg", default_max_tokens=64)


def refused(body: dict[str, Any], kind: Any = "completion") -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        parse(body, kind)
    return err.value


def test_a_completion_request_with_every_supported_field() -> None:
    gen = parse({
        "model": "disagg", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "u1", "n": 1,
    })  # fmt: skip
    assert (gen.prompt, gen.max_tokens, gen.temperature, gen.top_p, gen.seed) == ("hi", 5, 0.5, 0.9, 3)
    assert gen.stop == ("\n",) and gen.stream and gen.include_usage and gen.user == "u1"


def test_defaults_and_max_completion_tokens() -> None:
    assert parse({"model": "disagg", "prompt": "hi"}).max_tokens == COMPLETION_DEFAULT_MAX_TOKENS
    chat = {"model": "disagg", "messages": [{"role": "user", "content": "hi"}]}
    assert parse(chat, "chat").max_tokens == 64
    assert parse({**chat, "max_tokens": 9, "max_completion_tokens": 7}, "chat").max_tokens == 7


def test_chat_content_parts_are_joined() -> None:
    gen = parse({"model": "disagg", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, "chat")  # fmt: skip
    assert gen.messages == ({"role": "user", "content": "ab"},)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("tools", [{}]), ("tool_choice", "auto"), ("functions", [{}]), ("logprobs", 2), ("echo", True),
     ("response_format", {"type": "json_object"}), ("best_of", 3), ("suffix", "x"), ("logit_bias", {"1": 2})],
)  # fmt: skip
def test_unsupported_fields_are_named(field: str, value: Any) -> None:
    err = refused({"model": "disagg", "prompt": "hi", field: value})
    assert (err.status, err.param) == (400, field)
    assert err.body()["error"]["param"] == field and err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "hi"}, "model"), ({"model": "disagg"}, "prompt"), ({"model": "disagg", "prompt": ["a", "b"]}, "prompt"),
     ({"model": "disagg", "prompt": "x", "max_tokens": 0}, "max_tokens"),
     ({"model": "disagg", "prompt": "x", "temperature": float("nan")}, "temperature"),
     ({"model": "disagg", "prompt": "x", "top_p": 2}, "top_p"),
     ({"model": "disagg", "prompt": "x", "seed": -1}, "seed"),
     ({"model": "disagg", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
     ({"model": "disagg", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options")],
)  # fmt: skip
def test_bad_values_are_named(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


def test_an_unknown_model_is_404() -> None:
    err = refused({"model": "gpt-4", "prompt": "hi"})
    assert (err.status, err.code) == (404, "model_not_found")


def test_a_body_that_is_not_an_object() -> None:
    assert refused([1, 2]).status == 400  # type: ignore[arg-type]


def feed_all(matcher: StopMatcher, deltas: list[str]) -> str:
    return "".join(matcher.feed(d) for d in deltas) + matcher.flush()


def test_stop_string_split_over_deltas_is_cut_before_it() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("abc E") == "abc "  # "E" may start the stop string: held
    assert matcher.feed("N") == ""
    assert matcher.feed("Dxyz") == "" and matcher.stopped
    assert matcher.flush() == ""


def test_held_text_that_is_not_a_stop_is_released() -> None:
    matcher = StopMatcher(("END",))
    assert feed_all(matcher, ["ab E", "Nd", " more E"]) == "ab ENd more E" and not matcher.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(("zz", "b")), ["a", "bzz"]) == "a"
    assert feed_all(StopMatcher(()), ["a", "b"]) == "ab"


def test_finish_reason() -> None:
    assert finish_reason(False, 16, 16) == "length"
    assert finish_reason(True, 16, 16) == "stop"  # a stop string on the last token
    assert finish_reason(False, 5, 16) == "stop"  # end id or a stop word
    assert finish_reason(False, None, 16) == "stop"


def test_chunks_and_bodies() -> None:
    first = chunk("chat", "chatcmpl-1", "disagg", 7, "", first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}  # fmt: skip
    assert "usage" not in first
    last = chunk("completion", "cmpl-1", "disagg", 7, None, "length", include_usage=True)
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"] is None
    only_usage = chunk("chat", "c", "disagg", 7, None, include_usage=True, usage_body=usage(3, 4))
    assert only_usage["choices"] == [] and only_usage["usage"]["total_tokens"] == 7
    body = full_body("chat", "c", "disagg", 7, "hi", "stop", usage(1, 2))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse(body)[6:]) == body


def test_ensemble_inputs() -> None:
    gen = parse({"model": "disagg", "prompt": "hi", "max_tokens": 4, "seed": 2, "stop": ["x", "y"], "top_p": 0.5})
    values = ensemble_values(gen, gen.prompt)
    assert values["text_input"].tolist() == [[b"hi"]] and values["max_tokens"].dtype.name == "int32"
    assert values["seed"].dtype.name == "uint64" and values["top_p"].dtype.name == "float32"
    assert values["stop_words"].tolist() == [[b"x", b"y"]] and bool(values["exclude_input_in_output"][0, 0])
    assert "temperature" not in values


@pytest.mark.parametrize(
    ("message", "status"),
    [("in ensemble 'ensemble', INVALID_ARG: 'max_tokens' must be between 1 and 4096, got 0", 400),
     ("in ensemble 'ensemble', UNAVAILABLE: overloaded: this orchestrator instance already serves 4", 503),
     ("ALREADY_EXISTS: request id 'x' is already in flight", 409),
     ("in ensemble 'ensemble', unexpected shape for input 'text_input'", 400),
     ("INTERNAL: boom\nTraceback (most recent call last): ...", 500)],
)  # fmt: skip
def test_ensemble_errors_map_to_statuses(message: str, status: int) -> None:
    err = classify(TritonError(message))
    assert err.status == status and "Traceback" not in err.message and not err.message.startswith("in ensemble")


def test_an_unreachable_server_is_503() -> None:
    assert classify(TritonError("connection refused", unreachable=True)).status == 503
