"""The OpenAI wire format, without a server: request bodies -> `Generation`, chunks and bodies back.

Everything here is pure (no I/O), so request validation, stop-string handling and the
shape of every chunk are unit-tested without Triton (tests/unit/frontend/).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Kind = Literal["completion", "chat"]

# OpenAI's legacy completions default; chat has no documented default, so the server picks one.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4  # OpenAI accepts up to 4 stop sequences

# Fields this server refuses (400 naming the field) unless they hold their harmless default.
# field -> the values that mean "not used"
_REFUSED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "parallel_tool_calls": (None, False, True),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Generation:
    """One validated request, ready to become ensemble inputs."""

    kind: Kind
    model: str
    prompt: str  # for chat: None until rendered; the app renders messages into it
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None
    messages: tuple[dict[str, Any], ...] = field(default=())


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(name, f"'{name}' must be a number, got {value!r}")
    if not low <= value <= high:
        raise bad_request(name, f"'{name}' must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"'{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad_request(name, f"'{name}' must be {bound}, got {value}")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise bad_request("stop", "'stop' must be a string or a list of strings")
    if len(words) > MAX_STOP_STRINGS:
        raise bad_request("stop", f"'stop' holds {len(words)} strings; at most {MAX_STOP_STRINGS} are accepted")
    return tuple(w for w in words if w)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, harmless in _REFUSED.items():
        if name in body and body[name] not in harmless:
            raise bad_request(name, f"'{name}' is not supported by this server", code="unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", f"'n'={n!r} is not supported: this server returns one choice (n=1)", "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("response_format", "only response_format {'type': 'text'} is supported", "unsupported_value")


def _messages(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "'messages' must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}]", f"messages[{i}] must be an object with a 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content", f"messages[{i}].content must be a string")
        if message.get("tool_calls"):
            raise bad_request(f"messages[{i}].tool_calls", "tool calls are not supported", "unsupported_parameter")
        out.append({"role": message["role"], "content": content})
    return tuple(out)


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad_request("prompt", "'prompt' must be one string: batches and token-id prompts are not supported")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt", "'prompt' must be a non-empty string")
    return prompt


def parse_request(body: Any, kind: Kind, *, served_model: str, default_max_tokens: int) -> Generation:
    """Validate an OpenAI request body; raise `OpenAIError` naming the offending field."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model", "'model' is required")
    if model != served_model:
        raise OpenAIError(
            404, f"The model '{model}' does not exist; this server serves '{served_model}'",
            param="model", code="model_not_found",
        )  # fmt: skip
    _refuse_unsupported(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream", "'stream' must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options", "'stream_options' must be an object")
    if options and not stream:
        raise bad_request("stream_options", "'stream_options' is only allowed when 'stream' is true")
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == "chat":
        newer = _integer(body, "max_completion_tokens", 1)
        max_tokens = newer if newer is not None else max_tokens
        messages, prompt = _messages(body), ""
        default = default_max_tokens
    else:
        messages, prompt = (), _prompt(body)
        default = COMPLETION_DEFAULT_MAX_TOKENS
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user", "'user' must be a string")
    return Generation(
        kind=kind,
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=default if max_tokens is None else max_tokens,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        seed=_integer(body, "seed", 0, 2**64 - 1),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
        stop=_stop(body),
        user=user,
    )


class StopMatcher:
    """Text-level stop strings over a stream of deltas.

    The ensemble's `stop_words` match token sequences and keep the stop word in the output;
    OpenAI's `stop` ends the text before the first stop string, whatever the tokenization.
    So the frontend matches text: `feed` returns what is safe to emit now, holding back a
    tail that could still become a stop string; once one matched, `stopped` is True and
    nothing more is emitted.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.stopped = False
        self._held = ""
        self._keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._held + delta
        if not self.stops:
            return text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        cut = len(text)
        for k in range(min(self._keep, len(text)), 0, -1):  # longest tail that starts a stop string
            if any(s.startswith(text[-k:]) for s in self.stops):
                cut = len(text) - k
                break
        self._held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """At the end of the stream: the held tail was not a stop string after all."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held


def finish_reason(stopped: bool, output_tokens: int | None, max_tokens: int) -> str:
    """'length' only when the token budget ran out and no stop string matched; else 'stop'
    (an end token, a stop word, or a stop string)."""
    if stopped:
        return "stop"
    return "length" if output_tokens is not None and output_tokens >= max_tokens else "stop"


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(kind: Kind, text: str | None, finish: str | None, *, stream: bool, first: bool = False) -> dict[str, Any]:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if stream:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        elif first:
            delta["content"] = ""
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def chunk(
    kind: Kind, rid: str, model: str, created: int, text: str | None, finish: str | None = None,
    *, first: bool = False, include_usage: bool = False, usage_body: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk (`text_completion` / `chat.completion.chunk`). A usage-only chunk
    (OpenAI's last one with `include_usage`) has empty `choices`."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [] if usage_body is not None else [_choice(kind, text, finish, stream=True, first=first)],
    }
    if include_usage:
        body["usage"] = usage_body  # null on every chunk but the last, as OpenAI does
    return body


def full_body(
    kind: Kind, rid: str, model: str, created: int, text: str, finish: str, usage_body: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice(kind, text, finish, stream=False)],
        "usage": usage_body,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def now() -> int:
    return int(time.time())


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "disagg"}]}
