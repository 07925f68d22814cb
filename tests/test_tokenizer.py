"""The agent's tokenizer (agent/models/tokenizer.py) builds the very ids mlx-lm's does.

Each case renders a conversation with flock's tokenizers + jinja2 tokenizer and with mlx-lm's
`tokenizer_utils.load` (transformers underneath) on the same directory, and compares ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.models.tokenizer import chat_templates, default_chat_template, load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & \"here\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

# A Qwen-style tool template: tojson, namespace, loop controls, raise_exception, reasoning.
TOOL_TEMPLATE = """
{%- if tools %}<|im_start|>system
{{ strftime_now('%Y') }} tools:{% for tool in tools %}
{{ tool | tojson }}{% endfor %}<|im_end|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + message.role) }}{% endif %}
{%- if message.role == 'tool' and loop.index0 < 0 %}{% break %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.reasoning_content is defined and loop.index0 > ns.last_user %}<think>{{ message.reasoning_content }}</think>{% endif %}
{%- if message.content is defined %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls | default([]) %}
<tool_call>{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}
{%- generation %}{{ bos_token }}{% endgeneration %}"""  # noqa: E501 - a template, as written

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "héllo 🙂 <|im_end|> tabs\t\n\n  spaces"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And Spain?"}],
    [{"role": "user", "content": "Weather in Oslo?"},
     {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                       "arguments": {"city": "Oslo"}}}]},
     {"role": "tool", "content": "{\"temp\": -3}"}],
]


def _theirs(model_dir: Path) -> Any:
    from mlx_lm.tokenizer_utils import load

    return load(model_dir)


def _copy(smollm2_dir: Path, dest: Path, template: str | None = None) -> Path:
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "config.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, dest / name)
    if template is not None:
        config = json.loads((dest / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def test_smollm2_chat_ids_equal_mlx_lm(smollm2_dir: Path) -> None:
    ours, theirs = load_tokenizer(smollm2_dir), _theirs(smollm2_dir)
    assert ours.chat_template == theirs.chat_template
    assert ours.eos_token_id == theirs.eos_token_id
    for conversation in CONVERSATIONS[:2]:
        for prompt in (True, False):
            assert ours.apply_chat_template(conversation, add_generation_prompt=prompt) == \
                list(theirs.apply_chat_template(conversation, add_generation_prompt=prompt))


@pytest.mark.parametrize("text", ["Hello world", "  leading and trailing  ", "日本語\n\n\t",
                                  "<|im_start|>user\nhi<|im_end|>", "", "a" * 500])
def test_encode_equals_mlx_lm(smollm2_dir: Path, text: str) -> None:
    assert load_tokenizer(smollm2_dir).encode(text) == _theirs(smollm2_dir).encode(text)


def test_tool_template_ids_equal_mlx_lm(smollm2_dir: Path, tmp_path: Path) -> None:
    model = _copy(smollm2_dir, tmp_path / "m", TOOL_TEMPLATE)
    ours, theirs = load_tokenizer(model), _theirs(model)
    for conversation in CONVERSATIONS:
        for tools in (None, [WEATHER]):
            kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": True}
            if tools:
                kwargs["tools"] = tools
            assert ours.apply_chat_template(conversation, **kwargs) == \
                list(theirs.apply_chat_template(conversation, **kwargs))
            text = ours.apply_chat_template(conversation, **{**kwargs, "tokenize": False})
            assert text == theirs.apply_chat_template(conversation, **{**kwargs,
                                                                       "tokenize": False})
    # Template variables pass through, as with mlx-lm.
    off = {"add_generation_prompt": True, "enable_thinking": False}
    assert ours.apply_chat_template(CONVERSATIONS[0], **off) == \
        list(theirs.apply_chat_template(CONVERSATIONS[0], **off))


def test_template_errors_are_raised_as_in_transformers(smollm2_dir: Path,
                                                       tmp_path: Path) -> None:
    import jinja2

    model = _copy(smollm2_dir, tmp_path / "m", TOOL_TEMPLATE)
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        load_tokenizer(model).apply_chat_template([{"role": "robot", "content": "x"}])


def test_thinking_vocabulary_turns_thinking_on_as_mlx_lm_does(smollm2_dir: Path,
                                                               tmp_path: Path) -> None:
    model = _copy(smollm2_dir, tmp_path / "m", TOOL_TEMPLATE)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    top = max(t["id"] for t in tokenizer["added_tokens"])
    for i, content in enumerate(("<think>", "</think>")):
        tokenizer["added_tokens"].append({
            "id": top + 1 + i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": False})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    ours, theirs = load_tokenizer(model), _theirs(model)
    assert ours.has_thinking and theirs.has_thinking
    assert ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) == \
        list(theirs.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True))


def test_chat_template_files_take_priority_as_in_transformers(smollm2_dir: Path,
                                                              tmp_path: Path) -> None:
    model = _copy(smollm2_dir, tmp_path / "m", "{{ 'from config' }}")
    (model / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    assert chat_templates(model) == TOOL_TEMPLATE
    ours, theirs = load_tokenizer(model), _theirs(model)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == \
        list(theirs.apply_chat_template(CONVERSATIONS[0]))
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text(
        "{% for t in tools %}{{ t.function.name }}{% endfor %}")
    ours, theirs = load_tokenizer(model), _theirs(model)
    assert isinstance(ours.chat_template, dict) and default_chat_template(model) == TOOL_TEMPLATE
    for tools in (None, [WEATHER]):
        assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == \
            list(theirs.apply_chat_template(CONVERSATIONS[0], tools=tools))
