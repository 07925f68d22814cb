"""Reasoning text and the MoE families' call formats, on recorded model outputs: detected from
chat templates (excerpts of the published ones), split whole and streamed character by
character (so every tag spans chunks), with the same result both ways."""

from __future__ import annotations

import pytest

from agent.tools.families import DS_CALL_BEGIN, DS_CALL_END, DS_CALLS_BEGIN, DS_CALLS_END, DS_SEP
from agent.tools.formats import detect_tool_format, prepare_conversation
from agent.tools.output import OutputStream, split_output
from agent.tools.reasoning import NO_REASONING, ReasoningStyle, Thought, detect_reasoning
from agent.tools.types import ToolCall, ToolChoice, ToolFormat, ToolSpec

# --- template excerpts (the parts detection reads) ----------------------------------------

QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '</tools>\\nFor each function call, return a json "
    "object within <tool_call></tool_call> XML tags' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + "
    "'\\n</think>\\n\\n' + content }}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
ASSISTANT = "<\uff5cAssistant\uff5c>"  # DeepSeek's fullwidth bars
DEEPSEEK_R1 = (
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'" + ASSISTANT + "<think>\\n'}}"
    "{% endif %}")
DEEPSEEK_V3 = (
    "{% if tools %}{{ tools }}{% endif %}{{'" + ASSISTANT + DS_CALLS_BEGIN + DS_CALL_BEGIN
    + "' + tool['type'] + '" + DS_SEP + "' + tool['function']['name'] + '\\n' + '```json' + "
    "'\\n' + tool['function']['arguments'] + '\\n' + '```' + '" + DS_CALL_END + "'}}")
DEEPSEEK_V31 = (
    "{% if tools %}{{ tools }}{% endif %}{{'" + DS_CALLS_BEGIN + DS_CALL_BEGIN
    + "' + tool['function']['name'] + '" + DS_SEP + "' + tool['function']['arguments'] + '"
    + DS_CALL_END + "'}}{% if add_generation_prompt %}{{'" + ASSISTANT + "</think>'}}{% endif %}")
GLM45 = (
    "{%- if tools -%}<|system|>\\n# Tools\\n{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>\\n<arg_value>{arg-value-1}"
    "</arg_value>\\n</tool_call>{%- endif -%}{{ '\\n<think>' + reasoning_content + '</think>' }}"
    "{%- if add_generation_prompt -%}<|assistant|>{{- '\\n<think></think>' if (enable_thinking "
    "is defined and not enable_thinking) else '' -}}{%- endif -%}")
MINIMAX = (
    "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    "<minimax:tool_call>\\n<invoke name=\"tool-name\">\\n<parameter name=\"key\">value"
    "</parameter>\\n</invoke>\\n</minimax:tool_call>{%- endif %}"
    "{{- '<think>\\n' ~ reasoning_content ~ '\\n</think>\\n\\n' }}"
    "{%- if add_generation_prompt -%}{{- ']~b]ai' ~ '\\n' }}{%- endif -%}")
GPT_OSS = (
    "{%- if tools %}{{- '<|start|>developer<|message|># Tools\\n' }}{%- endif %}"
    "{{- '<|start|>assistant<|channel|>commentary to=functions.' + tool_call.name + "
    "' <|constrain|>json<|message|>' + tool_call.arguments|tojson + '<|call|>' }}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")
SMOLLM2 = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\\n"
           "{{ message['content'] }}<|im_end|>\\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")


@pytest.mark.parametrize(("template", "reasoning", "tools"), [
    (QWEN3, ReasoningStyle("think"), "hermes"),
    (DEEPSEEK_R1, ReasoningStyle("think", opened=True), "default"),
    (DEEPSEEK_V3, NO_REASONING, "deepseek_v3"),
    (DEEPSEEK_V31, ReasoningStyle("think"), "deepseek_v31"),
    (GLM45, ReasoningStyle("think"), "glm45"),
    (MINIMAX, ReasoningStyle("think"), "minimax"),
    (GPT_OSS, ReasoningStyle("harmony"), "harmony"),
    (SMOLLM2, NO_REASONING, "default"),
])
def test_formats_are_read_from_the_chat_template(template: str, reasoning: ReasoningStyle,
                                                 tools: str) -> None:
    assert detect_reasoning(template) == reasoning
    assert detect_tool_format(template) == tools


# --- recorded outputs -------------------------------------------------------------------

WEATHER = ToolSpec("get_weather", "", {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"}}})
NAMES = {"get_weather", "get_time"}
SCHEMAS = {"get_weather": WEATHER.parameters, "get_time": {"type": "object"}}
PARIS = ToolCall(name="get_weather", arguments={"city": "Paris", "days": 2})


def split(text: str, reasoning: ReasoningStyle, tools: ToolFormat | None,
          chunked: bool) -> tuple[list[object], str, str]:
    """(pieces without thoughts, reasoning, answer) of an output, whole or one char a chunk."""
    stream = OutputStream(reasoning, tools, NAMES, None, SCHEMAS)
    if not chunked:
        parsed = split_output(stream, text)
        return parsed.pieces, parsed.reasoning, parsed.text
    pieces = [p for c in text for p in stream.feed(c)] + stream.finish()
    merged: list[object] = []
    for piece in pieces:
        if merged and type(piece) is type(merged[-1]) and isinstance(piece, str | Thought):
            last = merged[-1]
            merged[-1] = (last + piece if isinstance(piece, str)  # type: ignore[operator]
                          else Thought(last.text + piece.text))  # type: ignore[union-attr]
        else:
            merged.append(piece)
    thoughts = "".join(p.text for p in merged if isinstance(p, Thought))
    rest = [p for p in merged if not isinstance(p, Thought)]
    return rest, thoughts, "".join(p for p in rest if isinstance(p, str))


CASES: list[tuple[str, str, ReasoningStyle, ToolFormat | None, str, str, list[ToolCall]]] = [
    ("qwen3 think then answer", "<think>\nThe user asks for France's capital.\n</think>\n\n"
     "The capital of France is Paris.", ReasoningStyle("think"), None,
     "The user asks for France's capital.", "The capital of France is Paris.", []),
    ("qwen3 think then call", "<think>\nI should look up the weather.\n</think>\n\n"
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
     "</tool_call>", ReasoningStyle("think"), "hermes", "I should look up the weather.", "",
     [PARIS]),
    ("deepseek-r1 opened by the prompt", "Paris is the capital; easy.\n</think>\n\nParis.",
     ReasoningStyle("think", opened=True), None, "Paris is the capital; easy.", "Paris.", []),
    ("reasoning cut short", "<think>Let me think about", ReasoningStyle("think"), None,
     "Let me think about", "", []),
    ("no reasoning from a thinking model", "Just Paris.", ReasoningStyle("think"), None, "",
     "Just Paris.", []),
    ("deepseek v3 fenced", "Let me check." + DS_CALLS_BEGIN + DS_CALL_BEGIN + "function" + DS_SEP
     + 'get_weather\n```json\n{"city": "Paris", "days": 2}\n```' + DS_CALL_END + DS_CALL_BEGIN
     + "function" + DS_SEP + "get_time\n```json\n{}\n```" + DS_CALL_END + DS_CALLS_END,
     NO_REASONING, "deepseek_v3", "", "Let me check.",
     [PARIS, ToolCall(name="get_time", arguments={})]),
    ("deepseek v3.1 bare", DS_CALLS_BEGIN + DS_CALL_BEGIN + "get_weather" + DS_SEP
     + '{"city": "Paris", "days": 2}' + DS_CALL_END + DS_CALLS_END, ReasoningStyle("think"),
     "deepseek_v31", "", "", [PARIS]),
    ("glm 4.5 think and call", "<think>Need weather.</think>\n<tool_call>get_weather\n"
     "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
     "<arg_value>2</arg_value>\n</tool_call>", ReasoningStyle("think"), "glm45",
     "Need weather.", "", [PARIS]),
    ("glm 4.5 inline spacing", "<tool_call>get_weather <arg_key>city</arg_key> <arg_value>Paris"
     "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>", NO_REASONING,
     "glm45", "", "", [PARIS]),
    ("minimax", "<think>\nweather time\n</think>\n\nChecking.\n<minimax:tool_call>\n"
     '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
     '<parameter name="days">2</parameter>\n</invoke>\n<invoke name="get_time">\n</invoke>\n'
     "</minimax:tool_call>", ReasoningStyle("think"), "minimax", "weather time", "Checking.",
     [PARIS, ToolCall(name="get_time", arguments={})]),
    ("harmony analysis then final", "<|channel|>analysis<|message|>User wants the capital."
     "<|end|><|start|>assistant<|channel|>final<|message|>Paris.", ReasoningStyle("harmony"),
     None, "User wants the capital.", "Paris.", []),
    ("harmony call", "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
     "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
     '<|message|>{"city": "Paris", "days": 2}<|call|>', ReasoningStyle("harmony"), "harmony",
     "Need the weather tool.", "", [PARIS]),
    ("harmony recipient in the header", "<|start|>assistant to=functions.get_weather"
     '<|channel|>commentary json<|message|>{"city": "Paris", "days": 2}',
     ReasoningStyle("harmony"), "harmony", "", "", [PARIS]),
    ("harmony plain text", "Paris.", ReasoningStyle("harmony"), None, "", "Paris.", []),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("name", "text", "reasoning", "tools", "thought", "answer", "calls"),
                         CASES, ids=[c[0] for c in CASES])
def test_recorded_outputs_split_into_reasoning_answer_and_calls(
        name: str, text: str, reasoning: ReasoningStyle, tools: ToolFormat | None,
        thought: str, answer: str, calls: list[ToolCall], chunked: bool) -> None:
    pieces, got_thought, got_answer = split(text, reasoning, tools, chunked)
    assert got_thought == thought
    assert got_answer == answer
    assert [p for p in pieces if isinstance(p, ToolCall)] == calls


def test_reasoning_is_never_in_the_answer_when_tools_are_not_parsed() -> None:
    """A harmony call addressed to a tool the request does not offer stays out of the answer's
    reasoning and comes back as text, not as a call."""
    text = ("<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.unknown <|constrain|>json<|message|>{"a": 1}<|call|>')
    pieces, thought, answer = split(text, ReasoningStyle("harmony"), "harmony", chunked=True)
    assert thought == "hmm" and answer == '{"a": 1}'
    assert not any(isinstance(p, ToolCall) for p in pieces)


def test_bare_text_arguments_follow_the_schema_types() -> None:
    text = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>2</arg_value>\n"
            "<arg_key>hourly</arg_key>\n<arg_value>true</arg_value>\n</tool_call>")
    pieces, _, _ = split(text, NO_REASONING, "glm45", chunked=False)
    assert pieces == [ToolCall(name="get_weather", arguments={"city": "2", "hourly": True})]


def test_deepseek_history_calls_get_json_text_arguments() -> None:
    """DeepSeek's templates concatenate a replayed call's arguments, so they must be text."""
    from agent.generation import ChatMessage
    messages = [ChatMessage(role="assistant", tool_calls=[PARIS.as_template_call()])]
    conversation, _ = prepare_conversation("deepseek_v3", messages, [WEATHER], ToolChoice())
    arguments = conversation[0].tool_calls[0]["function"]["arguments"]  # type: ignore[index]
    assert arguments == '{"city": "Paris", "days": 2}'
