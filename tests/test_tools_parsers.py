"""Tool-call parsers on the output formats real models of each family write, including
malformed and cut-off calls, and streamed output agreeing with whole output however it is cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tools.parsers import ToolCallStream, parse_output
from agent.tools.types import ToolCall, ToolFormat

NAMES = {"get_weather", "get_time", "search"}


def calls(fmt: ToolFormat, text: str, max_calls: int | None = None) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in parse_output(fmt, text, NAMES, max_calls).calls]


def text_of(fmt: ToolFormat, text: str) -> str:
    return parse_output(fmt, text, NAMES).text


# --- Hermes / Qwen (and flock's default format) ---------------------------------------------

QWEN_TWO_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n'
    "</tool_call>"
)


@pytest.mark.parametrize("fmt", ["hermes", "default"])
def test_qwen_style_calls_parse_in_order(fmt: ToolFormat) -> None:
    parsed = parse_output(fmt, QWEN_TWO_CALLS, NAMES)
    assert parsed.text == ""
    assert [(c.name, c.arguments) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "Europe/Paris"}),
    ]


def test_hermes_2_pro_writes_arguments_before_the_name() -> None:
    out = '<tool_call>\n{"arguments": {"query": "TSLA"}, "name": "search"}\n</tool_call>'
    assert calls("hermes", out) == [("search", {"query": "TSLA"})]


def test_text_before_a_call_is_kept_without_the_whitespace_next_to_the_call() -> None:
    out = 'Let me check that.\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    parsed = parse_output("hermes", out, NAMES)
    assert parsed.text == "Let me check that."
    assert calls("hermes", out) == [("get_time", {})]


def test_arguments_written_as_a_json_string_are_decoded() -> None:
    out = '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"mlx\\"}"}</tool_call>'
    assert calls("hermes", out) == [("search", {"query": "mlx"})]


def test_a_call_without_arguments_has_empty_arguments() -> None:
    assert calls("hermes", '<tool_call>{"name": "get_time"}</tool_call>') == [("get_time", {})]


def test_an_unclosed_but_complete_call_at_the_end_still_counts() -> None:
    out = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
    assert calls("hermes", out) == [("get_time", {"zone": "UTC"})]


@pytest.mark.parametrize("out", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
    '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',  # not JSON
    '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',  # not offered
    '<tool_call>\n{"name": "search", "arguments": [1, 2]}\n</tool_call>',  # not an object
    '<tool_call>\n["search", {}]\n</tool_call>',
    "<tool_call>",
    "Use <tool",
])
def test_malformed_or_partial_calls_stay_text_exactly(out: str) -> None:
    parsed = parse_output("hermes", out, NAMES)
    assert parsed.calls == []
    assert parsed.text == out


def test_a_bad_call_between_good_ones_stays_text_in_place() -> None:
    good = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    bad = "<tool_call>{oops}</tool_call>"
    parsed = parse_output("hermes", f"{good}\n{bad}\n{good}", NAMES)
    assert [c.name for c in parsed.calls] == ["get_time", "get_time"]
    assert parsed.text == bad


def test_tag_lookalikes_in_prose_are_text() -> None:
    out = "Wrap calls in <tool_calls> or <tool_> tags, not <tool_call."
    assert text_of("hermes", out) == out


def test_max_calls_keeps_only_the_first() -> None:
    assert calls("hermes", QWEN_TWO_CALLS, max_calls=1) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_without_a_name_list_any_name_is_a_call() -> None:
    parsed = parse_output("hermes", '<tool_call>{"name": "x", "arguments": {}}</tool_call>')
    assert parsed.calls == [ToolCall(name="x", arguments={})]


# --- Llama 3 JSON ---------------------------------------------------------------------------

def test_llama31_json_call_is_the_whole_reply() -> None:
    out = '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "F"}}'
    assert calls("llama3", out) == [("get_weather", {"city": "San Francisco, CA", "unit": "F"})]


def test_llama_python_tag_prefix_and_several_calls() -> None:
    out = ('<|python_tag|>{"name": "get_time", "parameters": {}}; '
           '{"name": "search", "parameters": {"query": "x"}}')
    assert calls("llama3", out) == [("get_time", {}), ("search", {"query": "x"})]


def test_llama32_extra_type_field_is_tolerated() -> None:
    out = '{"type": "function", "name": "search", "parameters": {"query": "weather"}}'
    assert calls("llama3", out) == [("search", {"query": "weather"})]


@pytest.mark.parametrize("out", [
    "The weather is fine.",
    'I would call {"name": "search", "parameters": {}} but will not.',  # not the whole reply
    '{"answer": 42}',  # JSON, not a call
    '{"name": "search", "parameters": {"query": "x"',  # cut off
    '{"name": "search", "parameters": {}} and then some words',
])
def test_llama_output_that_is_not_only_calls_stays_text(out: str) -> None:
    parsed = parse_output("llama3", out, NAMES)
    assert parsed.calls == []
    assert parsed.text == out


# --- Mistral --------------------------------------------------------------------------------

def test_mistral_v3_list_of_calls() -> None:
    out = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
           '{"name": "get_time", "arguments": {}}]')
    assert calls("mistral", out) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_mistral_v11_name_args_form_with_and_without_call_ids() -> None:
    out = ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
           '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}')
    assert calls("mistral", out) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_mistral_text_before_the_marker_is_text() -> None:
    out = 'Checking. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]'
    parsed = parse_output("mistral", out, NAMES)
    assert parsed.text == "Checking."
    assert [c.name for c in parsed.calls] == ["get_time"]


@pytest.mark.parametrize("out", [
    '[TOOL_CALLS] [{"name": "get_time", "arguments": {}',
    "[TOOL_CALLS] not json",
    '[TOOL_CALLS]launch[ARGS]{"now": true}',
    '[TOOL_CALLS]get_time[ARGS]{"a": 1} trailing',
])
def test_malformed_mistral_calls_stay_text(out: str) -> None:
    parsed = parse_output("mistral", out, NAMES)
    assert parsed.calls == []
    assert parsed.text == out


# --- streaming ------------------------------------------------------------------------------

def test_possible_call_openings_are_held_back_until_decided() -> None:
    stream = ToolCallStream("hermes", NAMES)
    assert stream.feed("Sure") == ["Sure"]
    assert stream.feed(" <tool") == []  # may be a call
    assert stream.feed("bar> is a tag.") == [" <toolbar> is a tag."]
    assert stream.feed(" <tool_call>{\"name\": \"get_time\", ") == []
    assert stream.feed('"arguments": {}}</tool_call>') == [ToolCall("get_time", {})]
    assert stream.finish() == []


def test_llama_text_streams_as_soon_as_it_cannot_be_a_call() -> None:
    stream = ToolCallStream("llama3", NAMES)
    assert stream.feed("  ") == []
    assert stream.feed("<|python") == []
    assert stream.feed("_tag|>{") == []
    stream = ToolCallStream("llama3", NAMES)
    assert stream.feed("The") == ["The"]
    assert stream.feed(" end") == [" end"]


OUTPUTS: list[tuple[ToolFormat, str]] = [
    ("hermes", QWEN_TWO_CALLS),
    ("hermes", "Text first.\n" + QWEN_TWO_CALLS + "\nAnd after."),
    ("hermes", "<tool_call>{bad}</tool_call> then <tool_call>{\"name\": \"search\"}"),
    ("default", "  plain text with trailing space  "),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}'),
    ("llama3", "  Just words {not json}"),
    ("mistral", 'ok [TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]search[ARGS]{"query": "q"}'),
    ("mistral", "[TOOL_CALLS] broken"),
]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(OUTPUTS), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_output_equals_whole_output_however_it_is_cut(
        case: tuple[ToolFormat, str], cuts: list[int]) -> None:
    fmt, text = case
    points = sorted({min(c, len(text)) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    stream = ToolCallStream(fmt, NAMES)
    pieces = [p for part in parts for p in stream.feed(part)] + stream.finish()
    whole = parse_output(fmt, text, NAMES)
    assert "".join(p for p in pieces if isinstance(p, str)) == whole.text
    assert [p for p in pieces if isinstance(p, ToolCall)] == whole.calls
