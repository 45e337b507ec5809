"""Chat messages -> one prompt string, with the model's own chat template.

``render_chat(messages, tokenizer_dir)`` renders OpenAI-style chat messages the way
transformers' ``apply_chat_template(..., tokenize=False)`` does:

* the template is ``chat_template.jinja`` in the tokenizer folder if present, else
  ``chat_template`` of its ``tokenizer_config.json``: a string, or a list of
  ``{"name", "template"}`` of which the one named ``"default"`` is used;
* Jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
  ``loopcontrols`` extension and a no-op ``{% generation %}`` tag, a ``tojson`` filter
  that keeps non-ASCII characters, and the globals ``raise_exception(message)`` and
  ``strftime_now(format)``;
* variables ``messages``, ``add_generation_prompt`` and ``bos_token`` /
  ``eos_token`` / ``pad_token`` / ``unk_token`` from the config (a string or
  ``{"content": ...}``; ``""`` when absent).

Messages are checked first: each is an object with ``role`` one of system, user,
assistant and ``content`` a string or a list of ``{"type": "text", "text": ...}``
parts, which are joined with newlines (so templates that expect a string, like
Llama 3's, work).  The template sees only ``role`` and ``content``.  Tool and
function calls, images and audio are refused with an error that names the field.

The built-in tokenizer (``tokenizer_dir`` None, ``""`` or ``"builtin"``) and a
folder without a template use ``DEFAULT_CHAT_TEMPLATE``: each message as
``<|role|>\\ncontent\\n``, then ``<|assistant|>\\n`` when a generation prompt is
asked for.  It is plain ASCII punctuation and the message text, which the built-in
tokenizer encodes (bytes, plus its words) and decodes back unchanged.

Errors: a bad message raises ``InvalidChatMessage`` and a template's
``raise_exception`` raises ``ChatTemplateRejected``; both are ``InvalidInput``
(the client must change the request).  A template that cannot be read, compiled or
rendered raises ``ChatTemplateError`` (a ``ValueError``: the deployment's tokenizer
folder needs fixing).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from orchestrator.text.tokenizer import read_tokenizer_config, token_content
from orchestrator.wire.errors import InvalidInput

ROLES: Final = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIAL_TOKENS: Final = ("bos_token", "eos_token", "pad_token", "unk_token")


class InvalidChatMessage(InvalidInput):
    """A message the frontend cannot render; ``field`` names it (``messages[1].role``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ChatTemplateRejected(InvalidInput):
    """The chat template called ``raise_exception``: the conversation does not fit the model."""


class ChatTemplateError(ValueError):
    """The tokenizer folder's chat template cannot be read, compiled or rendered."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check OpenAI-style chat messages; returns them as ``{"role", "content": str}``."""
    if not isinstance(messages, list) or not messages:
        raise InvalidChatMessage("messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidChatMessage(where, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            hint = " (tools are not supported)" if role in ("tool", "function") else ""
            if role == "developer":
                hint = " (send developer instructions as role system)"
            raise InvalidChatMessage(f"{where}.role", f"{role!r} is not supported{hint}; use one of {', '.join(ROLES)}")
        for key in ("tool_calls", "function_call"):
            if message.get(key):
                raise InvalidChatMessage(f"{where}.{key}", "tool and function calls are not supported; send text only")
        checked.append({"role": role, "content": _content_text(message.get("content"), f"{where}.content")})
    return checked


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidChatMessage(where, 'must be a string or a list of {"type": "text", "text": ...} parts')
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            what = f"type {kind!r} is" if kind is not None else "parts other than text are"
            raise InvalidChatMessage(f"{where}[{j}]", f'{what} not supported; send {{"type": "text", "text": ...}}')
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidChatMessage(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _raise_exception(message: str) -> None:
    raise ChatTemplateRejected(f"the model's chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> Any:
    try:
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ChatTemplateError("chat templates need the 'jinja2' package: pip install jinja2") from exc

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant mask) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it may use."""

    __slots__ = ("_template", "source", "special_tokens")

    def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None, source: str = "") -> None:
        self.source = source or "the chat template"
        self.special_tokens = {name: "" for name in _SPECIAL_TOKENS} | dict(special_tokens or {})
        try:
            self._template = _environment().from_string(template)
        except Exception as exc:  # TemplateSyntaxError and friends
            raise ChatTemplateError(f"{self.source} does not compile: {exc}") from exc

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        checked = validate_messages(messages)
        try:
            return str(
                self._template.render(
                    messages=checked, add_generation_prompt=add_generation_prompt, **self.special_tokens
                )
            )
        except InvalidInput:
            raise
        except Exception as exc:
            raise ChatTemplateError(f"{self.source} failed to render: {type(exc).__name__}: {exc}") from exc


def _pick_template(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        if isinstance(template, str):
            return template
        raise ChatTemplateError(
            f"{path}: chat_template lists templates {sorted(map(str, named))} but none named 'default'; "
            "add one named 'default'"
        )
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list of {{name, template}}")


@functools.lru_cache(maxsize=16)
def load_chat_template(tokenizer_dir: str | None) -> ChatTemplate:
    """The template of a Hugging Face tokenizer folder, or the default (see module doc)."""
    if tokenizer_dir is None or tokenizer_dir in ("", "builtin"):
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, source="the default chat template")
    if not os.path.isdir(tokenizer_dir):
        raise ChatTemplateError(f"tokenizer directory does not exist: {tokenizer_dir!r}")
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    try:
        config = read_tokenizer_config(config_path)
    except ValueError as exc:
        raise ChatTemplateError(str(exc)) from exc
    special = {name: token_content(config.get(name)) or "" for name in _SPECIAL_TOKENS}
    jinja_path = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return ChatTemplate(f.read(), special, source=jinja_path)
        except OSError as exc:
            raise ChatTemplateError(f"cannot read chat template {jinja_path!r}: {exc}") from exc
    template = _pick_template(config.get("chat_template"), config_path)
    if template is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, special, source="the default chat template")
    return ChatTemplate(template, special, source=f"the chat_template of {config_path}")


def render_chat(messages: list[dict[str, Any]], tokenizer_dir: str | None, add_generation_prompt: bool = True) -> str:
    """The prompt for ``messages`` with the tokenizer folder's chat template (module doc)."""
    return load_chat_template(tokenizer_dir).render(messages, add_generation_prompt)
