"""A two-step tool loop against the real SmolLM2 through the official openai, anthropic and
ollama clients: a forced call parses and carries schema-valid arguments, its result goes back,
the final answer arrives; streamed and whole replies agree under greedy decoding.

SmolLM2's template has no tools, so this runs flock's default format end to end (tools in the
system prompt, `<tool_call>` output, results as `<tool_response>` turns).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import ollama
import openai
import pytest
from test_api_e2e import Node, node  # noqa: F401 (the module's agent fixture)

pytestmark = pytest.mark.slow

PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
}, "required": ["city", "unit"], "additionalProperties": False}
DESCRIPTION = "Get the current weather in a city"
QUESTION = "What is the weather like in Paris today?"
RESULT = {"city": "Paris", "temperature": 18, "unit": "celsius", "sky": "sunny"}
CALL_TOKENS = 60  # the forced call is about 30 tokens
ANSWER_TOKENS = 32


def weather(arguments: dict[str, Any]) -> str:
    jsonschema.validate(arguments, PARAMS)
    return json.dumps(RESULT)


def test_openai_forced_call_then_answer(node: Node) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "description": DESCRIPTION, "parameters": PARAMS}}]
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=node.model, messages=messages, tools=tools,  # type: ignore[arg-type]
                                           tool_choice=forced, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=CALL_TOKENS)
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls or []
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, PARAMS)

    chunks = list(client.chat.completions.create(
        model=node.model, messages=messages, tools=tools, tool_choice=forced,  # type: ignore[arg-type]
        temperature=0, max_tokens=CALL_TOKENS, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": weather(arguments)}]
    answer = client.chat.completions.create(model=node.model, messages=messages, tools=tools,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=ANSWER_TOKENS)
    text = answer.choices[0].message.content or ""
    assert text.strip() and answer.choices[0].message.tool_calls is None
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=node.model, messages=messages, tools=tools, temperature=0,  # type: ignore[arg-type]
        max_tokens=ANSWER_TOKENS, stream=True))
    assert streamed == text


def test_anthropic_forced_tool_use_then_answer(node: Node) -> None:  # noqa: F811
    client = anthropic.Anthropic(base_url=node.url, api_key="unused")
    tools = [{"name": "get_weather", "description": DESCRIPTION, "input_schema": PARAMS}]
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    forced = {"type": "tool", "name": "get_weather"}
    sampling = {"temperature": 0}
    first = client.messages.create(model=node.model, max_tokens=CALL_TOKENS, messages=messages,
                                   tools=tools, tool_choice=forced, extra_body=sampling)  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    jsonschema.validate(use.input, PARAMS)  # type: ignore[union-attr]

    with client.messages.stream(model=node.model, max_tokens=CALL_TOKENS, messages=messages,
                                tools=tools, tool_choice=forced,  # type: ignore[arg-type]
                                extra_body=sampling) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [  # type: ignore[union-attr]
        (use.name, use.input)]  # type: ignore[union-attr]

    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,  # type: ignore[union-attr]
                                               "content": weather(use.input)}]}]  # type: ignore[union-attr, arg-type]
    answer = client.messages.create(model=node.model, max_tokens=ANSWER_TOKENS,
                                    messages=messages, tools=tools, extra_body=sampling)  # type: ignore[arg-type]
    assert answer.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in answer.content if b.type == "text")  # type: ignore[union-attr]
    assert text.strip()
    with client.messages.stream(model=node.model, max_tokens=ANSWER_TOKENS, messages=messages,
                                tools=tools, extra_body=sampling) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == text


def test_ollama_forced_call_then_answer(node: Node) -> None:  # noqa: F811
    client = ollama.Client(host=node.url)
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "description": DESCRIPTION, "parameters": PARAMS}}]
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    # Ollama has no tool_choice; flock reads it from options (the client passes them through).
    forced = {"temperature": 0, "num_predict": CALL_TOKENS, "tool_choice": "get_weather"}
    first = client.chat(model=node.model, messages=messages, tools=tools, options=forced)  # type: ignore[arg-type]
    (call,) = first.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), PARAMS)

    parts = list(client.chat(model=node.model, messages=messages, tools=tools, options=forced,  # type: ignore[arg-type]
                             stream=True))
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [
        (call.function.name, dict(call.function.arguments))]

    messages += [{"role": "assistant", "content": "",
                  "tool_calls": [{"function": {"name": call.function.name,
                                               "arguments": dict(call.function.arguments)}}]},
                 {"role": "tool", "tool_name": "get_weather",
                  "content": weather(dict(call.function.arguments))}]
    options = {"temperature": 0, "num_predict": ANSWER_TOKENS}
    answer = client.chat(model=node.model, messages=messages, tools=tools, options=options)  # type: ignore[arg-type]
    assert (answer.message.content or "").strip() and not answer.message.tool_calls
    streamed_text = "".join(p.message.content or "" for p in client.chat(
        model=node.model, messages=messages, tools=tools, options=options, stream=True))  # type: ignore[arg-type]
    assert streamed_text == answer.message.content
