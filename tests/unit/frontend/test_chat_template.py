"""Tests for orchestrator.frontend.chat_template: Hugging Face templates rendered as
transformers does, the default template for the built-in tokenizer, and message checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.frontend.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    ChatTemplateRejected,
    InvalidChatMessage,
    render_chat,
)
from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.wire.errors import InvalidInput

# Llama 3's template (meta-llama/Meta-Llama-3-8B-Instruct), verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML written over several lines: indented block tags and their newlines vanish
# only with lstrip_blocks and trim_blocks, as transformers renders.
CHATML = """{% for message in messages %}
    {% if message['role'] in ['system', 'user', 'assistant'] %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant' }}
{% endif %}"""
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def folder(tmp_path: Path, **config: Any) -> str:
    """A tokenizer folder at tmp_path (created) with this tokenizer_config.json."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_llama3_template_with_bos_from_the_config(tmp_path: Path) -> None:
    d = folder(tmp_path, chat_template=LLAMA3, bos_token={"content": "<|begin_of_text|>", "lstrip": False})
    assert render_chat([*CHAT[:1], {"role": "user", "content": "  Hi there \n"}], d) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chatml_trims_blocks_and_lstrips(tmp_path: Path) -> None:
    d = folder(tmp_path, chat_template=CHATML, eos_token="<|im_end|>")
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    assert render_chat(CHAT, d) == expected + "<|im_start|>assistant\n"
    assert render_chat(CHAT, d, add_generation_prompt=False) == expected


def test_list_of_templates_uses_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    d = folder(tmp_path, chat_template=templates)
    assert render_chat(CHAT, d).endswith("<|im_start|>assistant\n")


def test_list_without_default_is_a_config_error(tmp_path: Path) -> None:
    d = folder(tmp_path, chat_template=[{"name": "tool_use", "template": "TOOLS"}])
    with pytest.raises(ChatTemplateError, match="default"):
        render_chat(CHAT, d)


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}{{ bos_token }}")
    d = folder(tmp_path, chat_template=CHATML, bos_token="<s>")
    assert render_chat(CHAT, d) == "2<s>"


def test_tojson_keeps_unicode_and_strftime_now_exists(tmp_path: Path) -> None:
    d = folder(tmp_path, chat_template="{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') | length }}")
    assert render_chat([{"role": "user", "content": "你好 😀"}], d) == '"你好 😀"|4'


def test_generation_tag_and_loop_controls(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    assert render_chat(CHAT, folder(tmp_path, chat_template=template)) == "[Hi there]"


def test_raise_exception_becomes_a_client_error(tmp_path: Path) -> None:
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(ChatTemplateRejected, match="System role not supported") as info:
        render_chat(CHAT, folder(tmp_path, chat_template=template))
    assert isinstance(info.value, InvalidInput) and isinstance(info.value, ValueError)


def test_broken_or_unsafe_templates_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(CHAT, folder(tmp_path / "a", chat_template="{% for %}"))
    unsafe = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat(CHAT, folder(tmp_path / "b", chat_template=unsafe))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="cannot read"):
        render_chat(CHAT, str(tmp_path / "c"))
    with pytest.raises(ChatTemplateError, match="does not exist"):
        render_chat(CHAT, str(tmp_path / "missing"))


def test_text_parts_are_joined_with_newlines(tmp_path: Path) -> None:
    d = folder(tmp_path, chat_template=CHATML)
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert render_chat([{"role": "user", "content": parts}], d, False) == "<|im_start|>user\nHi\nthere<|im_end|>\n"


@pytest.mark.parametrize("tokenizer_dir", [None, "", "builtin"])
def test_default_template_for_the_builtin_tokenizer(tokenizer_dir: str | None) -> None:
    chat = [*CHAT, {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "the world, 你好"}]
    prompt = render_chat(chat, tokenizer_dir)
    assert prompt == (
        "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello! 😀\n<|user|>\nthe world, 你好\n<|assistant|>\n"
    )
    assert render_chat(chat, tokenizer_dir, add_generation_prompt=False) == prompt.removesuffix("<|assistant|>\n")
    tok = BuiltinTokenizer()
    ids = tok.encode(prompt)
    assert all(3 <= i < tok.vocab_size for i in ids)  # no specials, nothing out of the vocabulary
    assert tok.decode(ids) == prompt


def test_folder_without_template_uses_the_default(tmp_path: Path) -> None:
    assert render_chat(CHAT, folder(tmp_path, eos_token="</s>")) == render_chat(CHAT, None)
    assert "<|{{ message['role'] }}|>" in DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hello", "messages"),
        (["hello"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "messages[1].role"),
        ([{"role": "developer", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": 7}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], "messages[0].content[1]"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
    ],
)
def test_invalid_messages_name_the_field(messages: Any, field: str) -> None:
    with pytest.raises(InvalidChatMessage) as info:
        render_chat(messages, None)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_role_errors_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match=r"messages\[0\]\.role: 'tool' is not supported .*use one of system, user"):
        render_chat([{"role": "tool", "content": "42"}], None)
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]: type 'image_url' is not supported; send"):
        render_chat([{"role": "user", "content": [{"type": "image_url"}]}], None)


def test_the_frontend_answers_a_bad_message_with_a_400_naming_the_field() -> None:
    """What the HTTP app makes of the template's errors: the client's fault names its field."""
    from orchestrator.frontend.app import render_prompt
    from orchestrator.frontend.protocol import OpenAIError

    with pytest.raises(OpenAIError) as info:
        render_prompt(({"role": "tool", "content": "x"},), None)
    assert info.value.status == 400 and info.value.param == "messages[0].role"
    assert render_prompt(({"role": "user", "content": "hello"},), None).endswith("<|assistant|>\n")
