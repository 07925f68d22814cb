"""Choosing a model's tool format from its chat template, and showing tools and tool turns to
models whose template has none (flock's default format)."""

from __future__ import annotations

import json

import pytest
from jinja2 import Environment

from agent.engine import ChatMessage
from agent.tools.formats import (
    default_tool_prompt,
    detect_tool_format,
    prepare_conversation,
    template_text,
)
from agent.tools.grammar import call_schema, close_objects, schema_problem
from agent.tools.types import ToolCall, ToolChoice, ToolSpec

# Excerpts with the markers each family's real template carries (not whole templates).
SMOLLM2 = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
           "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
QWEN25 = ("{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
          "{{- tool | tojson }}{%- endfor %}{{- '</tools>\\n<tool_call>\\n{\"name\": "
          "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call>' }}{%- endif %}")
LLAMA31 = ("{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
           "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"
           "{{- '<|python_tag|>' + tool_call.name }}")
LLAMA32 = ("{{- '<|start_header_id|>system<|end_header_id|>' }}{%- if tools is not none %}"
           "{{- 'Environment: ipython' }}{%- endif %}{{- 'Respond in the format {\"name\": "
           "function name, \"parameters\": dictionary of argument name and its value}.' }}")
MISTRAL = ("{%- if tools is not none %}{{- '[AVAILABLE_TOOLS] [' }}{%- for tool in tools %}"
           "{{- tool | tojson }}{%- endfor %}{{- '][/AVAILABLE_TOOLS]' }}{%- endif %}"
           "{{- '[TOOL_CALLS] [' }}")
COMMAND_R = "{% if tools %}Action: ```json\n{{ tools | tojson }}```{% endif %}"

WEATHER = ToolSpec("get_weather", "Weather now", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.mark.parametrize(("template", "fmt"), [
    (None, "default"),
    (SMOLLM2, "default"),
    (QWEN25, "hermes"),
    (LLAMA31, "llama3"),
    (LLAMA32, "llama3"),
    (MISTRAL, "mistral"),
    (COMMAND_R, "default"),  # tools, but a syntax flock does not parse: the default format
])
def test_format_comes_from_the_template(template: str | None, fmt: str) -> None:
    assert detect_tool_format(template) == fmt


def test_named_templates_use_the_tool_use_one() -> None:
    named = [{"name": "default", "template": SMOLLM2}, {"name": "tool_use", "template": QWEN25}]
    assert template_text(named) == QWEN25
    assert detect_tool_format(named) == "hermes"
    assert detect_tool_format({"default": SMOLLM2}) == "default"


def test_default_prompt_lists_each_tool_as_json_and_shows_the_call_syntax() -> None:
    prompt = default_tool_prompt([WEATHER])
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(listed) == WEATHER.as_template_tool()
    assert '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n' \
           "</tool_call>" in prompt


def conversation() -> list[ChatMessage]:
    call = ToolCall("get_weather", {"city": "Paris"}, id="call_1").as_template_call()
    return [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris and Rome?"),
        ChatMessage(role="assistant", content="", tool_calls=[call, call]),
        ChatMessage(role="tool", content='{"c": 18}', tool_call_id="call_1", name="get_weather"),
        ChatMessage(role="tool", content='{"c": 21}', tool_call_id="call_2", name="get_weather"),
    ]


def test_default_format_puts_tools_in_the_system_prompt_and_tool_turns_in_text() -> None:
    messages, template_tools = prepare_conversation("default", conversation(), [WEATHER],
                                                    ToolChoice())
    assert template_tools is None
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content.startswith("Be brief.\n\nYou can call functions")
    assert messages[2].content == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert messages[3].content == ('<tool_response>\n{"c": 18}\n</tool_response>\n'
                                   '<tool_response>\n{"c": 21}\n</tool_response>')
    assert all(m.tool_calls is None for m in messages)


def test_default_format_renders_through_a_template_without_tools() -> None:
    messages, _ = prepare_conversation("default", conversation(), [WEATHER], ToolChoice())
    text = Environment().from_string(SMOLLM2).render(
        messages=[{"role": m.role, "content": m.content} for m in messages])
    assert "<tools>" in text and "<tool_response>" in text and "<tool_call>" in text


def test_tool_choice_none_leaves_tools_out_of_the_prompt() -> None:
    messages, _ = prepare_conversation("default", conversation(), [WEATHER], ToolChoice("none"))
    assert messages[0].content == "Be brief."
    native, tools = prepare_conversation("hermes", conversation(), [WEATHER], ToolChoice("none"))
    assert tools is None and native == conversation()


def test_native_formats_hand_tools_and_turns_to_the_template_unchanged() -> None:
    messages, tools = prepare_conversation("hermes", conversation(), [WEATHER], ToolChoice())
    assert messages == conversation()
    assert tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather now", "parameters": WEATHER.parameters}}]


def test_call_schema_is_a_usable_schema_for_one_or_many_tools() -> None:
    clock = ToolSpec("get_time")
    assert schema_problem(call_schema([WEATHER])) is None
    assert schema_problem(call_schema([WEATHER, clock], "parameters")) is None
    assert [o["properties"]["name"] for o in call_schema([WEATHER, clock])["anyOf"]] == [
        {"const": "get_weather"}, {"const": "get_time"}]


@pytest.mark.parametrize(("schema", "needle"), [
    ({"type": "strng"}, "strng"),
    ({"$ref": "#/$defs/none"}, "none"),
    ([], "object"),
])
def test_unusable_schemas_are_explained(schema: object, needle: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and needle in problem


def test_closing_objects_reaches_every_nested_schema_and_keeps_explicit_choices() -> None:
    open_object = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {
            "properties": open_object,  # a property that happens to be called "properties"
            "list": {"type": "array", "items": open_object},
            "either": {"anyOf": [open_object, {"type": "string"}]},
            "free": {"type": "object", "properties": {}, "additionalProperties": True},
            "typed": {"type": "object", "additionalProperties": open_object},
        },
        "$defs": {"d": open_object},
    }
    closed = close_objects(schema)
    shut = {**open_object, "additionalProperties": False}
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"] == shut
    assert closed["properties"]["list"]["items"] == shut
    assert closed["properties"]["either"]["anyOf"] == [shut, {"type": "string"}]
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["properties"]["typed"]["additionalProperties"] == shut
    assert closed["$defs"]["d"] == shut
    assert "additionalProperties" not in schema  # the input is left as it was


def test_forced_calls_admit_only_the_declared_arguments() -> None:
    arguments = call_schema([WEATHER])["properties"]["arguments"]
    assert arguments["additionalProperties"] is False
    assert "additionalProperties" not in WEATHER.parameters


def test_a_user_turn_after_tool_results_joins_their_turn() -> None:
    messages, _ = prepare_conversation(
        "default", [*conversation(), ChatMessage(role="user", content="Which is warmer?")],
        [WEATHER], ToolChoice())
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1].content.endswith("</tool_response>\nWhich is warmer?")
