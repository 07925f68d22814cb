"""Tool calling and structured output over HTTP in all three APIs, through the official
clients, against EchoEngine (it replies with the user's last line, so a user turn holding a
call in the model's format comes back as that call). These pin wire shapes and what reaches the
engine; tests/test_tools_e2e.py runs the real model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import httpx
import msgspec
import ollama
import openai
import pytest
from echo_engine import ECHO_MODEL, EchoEngine, running_server

from agent.api.app import create_app
from agent.engine import ModelInfo, ModelNotFound
from agent.settings import NodeSettings

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather now",
                    "input_schema": WEATHER_PARAMS},
                   {"name": "get_time", "input_schema": {"type": "object"}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TWO_CALLS = CALL + '<tool_call>{"name": "get_time"}</tool_call>'
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}},
          "required": ["answer"]}
CLOSED = {**SCHEMA, "additionalProperties": False}  # strict schemas admit no other properties


WIDE_ECHO = msgspec.structs.replace(ECHO_MODEL, context_length=4096)


class WideEcho(EchoEngine):
    """The echo model with room for replies holding several calls."""

    def list_models(self) -> list[ModelInfo]:
        return [WIDE_ECHO]

    def get_model(self, name: str) -> ModelInfo:
        if name != WIDE_ECHO.name:
            raise ModelNotFound(name)
        return WIDE_ECHO


@dataclass
class Server:
    url: str
    engine: EchoEngine
    openai: openai.OpenAI
    anthropic: anthropic.Anthropic
    ollama: ollama.Client
    http: httpx.Client


def serve(engine: EchoEngine) -> Iterator[Server]:
    """A real server over `engine`, with the three official clients pointed at it."""
    app = create_app(engine, NodeSettings(max_tokens_default=1000))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield Server(url, engine,
                     openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0),
                     anthropic.Anthropic(base_url=url, api_key="k", max_retries=0),
                     ollama.Client(host=url), http)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serve(WideEcho())


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_call_comes_back_as_tool_calls_with_json_arguments(server: Server) -> None:
    reply = server.openai.chat.completions.create(model="echo", messages=user(CALL),
                                                  tools=OPENAI_TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert server.engine.requests[-1].grammar is None  # auto: the model decides


def test_openai_streamed_calls_equal_the_whole_response(server: Server) -> None:
    text = "Checking both. " + TWO_CALLS
    whole = server.openai.chat.completions.create(model="echo", messages=user(text),
                                                  tools=OPENAI_TOOLS).choices[0]
    chunks = list(server.openai.chat.completions.create(
        model="echo", messages=user(text), tools=OPENAI_TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""  # type: ignore[union-attr]
            entry["arguments"] += delta.function.arguments or ""  # type: ignore[union-attr]
    assert content == whole.message.content == "Checking both."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments))
        for c in whole.message.tool_calls or []]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_text_that_is_not_a_call_stays_content(server: Server) -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    reply = server.openai.chat.completions.create(model="echo", messages=user(text),
                                                  tools=OPENAI_TOOLS)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


def test_openai_parallel_tool_calls_false_keeps_one_call(server: Server) -> None:
    reply = server.openai.chat.completions.create(model="echo", messages=user(TWO_CALLS),
                                                  tools=OPENAI_TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == [
        "get_weather"]


@pytest.mark.parametrize(("choice", "names"), [
    ("required", ["get_weather", "get_time"]),
    ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
])
def test_openai_forced_choice_sends_a_call_grammar(server: Server, choice: object,
                                                   names: list[str]) -> None:
    server.openai.chat.completions.create(model="echo", messages=user(CALL), tools=OPENAI_TOOLS,
                                          tool_choice=choice)  # type: ignore[arg-type]
    grammar = server.engine.requests[-1].grammar or ""
    assert '"<tool_call>\\n"' in grammar
    for name in ("get_weather", "get_time"):
        assert (f'"const": "{name}"' in grammar) == (name in names)


def test_openai_tool_choice_none_sends_no_tools_and_parses_nothing(server: Server) -> None:
    reply = server.openai.chat.completions.create(model="echo", messages=user(CALL),
                                                  tools=OPENAI_TOOLS, tool_choice="none")
    assert reply.choices[0].message.content == CALL
    assert server.engine.rendered_tools[-1] is None
    assert server.engine.requests[-1].grammar is None


def test_openai_tools_reach_the_template(server: Server) -> None:
    server.openai.chat.completions.create(model="echo", messages=user("hi"), tools=OPENAI_TOOLS)
    assert [t["function"]["name"] for t in server.engine.rendered_tools[-1] or []] == [
        "get_weather", "get_time"]


def test_openai_history_with_calls_and_results_is_accepted(server: Server) -> None:
    messages = [
        *user("Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
        *user("Thanks"),
    ]
    reply = server.openai.chat.completions.create(model="echo", messages=messages,  # type: ignore[arg-type]
                                                  tools=OPENAI_TOOLS)
    assert reply.choices[0].message.content == "Thanks"


def test_openai_bad_history_arguments_are_400_naming_them(server: Server) -> None:
    messages = [*user("x"), {"role": "assistant", "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    response = server.http.post("/v1/chat/completions", json={"model": "echo",
                                                              "messages": messages})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(("fmt", "schema"), [
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
     CLOSED),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, SCHEMA),
])
def test_openai_response_format_constrains_to_a_schema(server: Server, fmt: dict,
                                                       schema: dict) -> None:
    server.openai.chat.completions.create(model="echo", messages=user('{"answer": 1}'),
                                          response_format=fmt)  # type: ignore[arg-type]
    assert server.engine.requests[-1].json_schema == schema


# --- Anthropic ------------------------------------------------------------------------------


def test_anthropic_call_is_a_tool_use_block(server: Server) -> None:
    message = server.anthropic.messages.create(model="echo", max_tokens=1000,
                                               messages=user("Sure. " + CALL),  # type: ignore[arg-type]
                                               tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert text.type == "text" and text.text == "Sure."  # type: ignore[union-attr]
    assert use.type == "tool_use" and use.name == "get_weather"  # type: ignore[union-attr]
    assert use.input == {"city": "Paris"} and use.id.startswith("toolu_")  # type: ignore[union-attr]


def test_anthropic_stream_sends_input_json_deltas_and_equals_the_whole(server: Server) -> None:
    text = "Both: " + TWO_CALLS + " done"
    whole = server.anthropic.messages.create(model="echo", max_tokens=1000, messages=user(text),  # type: ignore[arg-type]
                                             tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    with server.anthropic.messages.stream(model="echo", max_tokens=1000, messages=user(text),  # type: ignore[arg-type]
                                          tools=ANTHROPIC_TOOLS) as stream:  # type: ignore[arg-type]
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == whole.stop_reason == "tool_use"

    def shape(blocks: list) -> list:
        return [(b.type, getattr(b, "text", None), getattr(b, "name", None),
                 getattr(b, "input", None)) for b in blocks]

    assert shape(final.content) == shape(whole.content)
    raw = server.http.post("/v1/messages", json={
        "model": "echo", "max_tokens": 200, "messages": user(CALL), "tools": ANTHROPIC_TOOLS,
        "stream": True}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["index"] == 0
    assert start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["input"] == {}
    delta = next(e for e in events if e["type"] == "content_block_delta")
    assert delta["delta"] == {"type": "input_json_delta",
                              "partial_json": '{"city": "Paris"}'}


@pytest.mark.parametrize(("choice", "forced"), [
    ({"type": "any"}, True), ({"type": "tool", "name": "get_time"}, True),
    ({"type": "auto"}, False), ({"type": "none"}, False),
])
def test_anthropic_tool_choice(server: Server, choice: dict, forced: bool) -> None:
    server.anthropic.messages.create(model="echo", max_tokens=1000, messages=user("hi"),  # type: ignore[arg-type]
                                     tools=ANTHROPIC_TOOLS, tool_choice=choice)  # type: ignore[arg-type]
    grammar = server.engine.requests[-1].grammar
    assert (grammar is not None) == forced
    if choice["type"] == "tool":
        assert '"get_weather"' not in (grammar or "")


def test_anthropic_tool_results_go_back_as_tool_messages(server: Server) -> None:
    messages = [
        *user("Weather?"),
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "18C"}]},
            {"type": "text", "text": "And now?"}]},
    ]
    message = server.anthropic.messages.create(model="echo", max_tokens=1000, messages=messages,  # type: ignore[arg-type]
                                               tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert message.content[0].text == "And now?"  # type: ignore[union-attr]


def test_anthropic_output_format_constrains_to_the_schema(server: Server) -> None:
    response = server.http.post("/v1/messages", json={
        "model": "echo", "max_tokens": 50, "messages": user('{"answer": 2}'),
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    assert response.status_code == 200
    assert server.engine.requests[-1].json_schema == CLOSED


# --- Ollama ---------------------------------------------------------------------------------


def test_ollama_call_comes_back_in_message_tool_calls(server: Server) -> None:
    reply = server.ollama.chat(model="echo", messages=user(CALL), tools=OPENAI_TOOLS)
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}
    assert reply.message.content == ""
    assert reply.done_reason == "stop"


def test_ollama_streamed_calls_equal_the_whole(server: Server) -> None:
    whole = server.ollama.chat(model="echo", messages=user(TWO_CALLS), tools=OPENAI_TOOLS)
    parts = list(server.ollama.chat(model="echo", messages=user(TWO_CALLS), tools=OPENAI_TOOLS,
                                    stream=True))
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert "".join(p.message.content or "" for p in parts) == ""
    assert parts[-1].done


def test_ollama_tool_turns_in_the_history_are_accepted(server: Server) -> None:
    messages = [*user("Weather?"),
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18C", "tool_name": "get_weather"},
                *user("Thanks")]
    reply = server.ollama.chat(model="echo", messages=messages, tools=OPENAI_TOOLS)
    assert reply.message.content == "Thanks"


@pytest.mark.parametrize(("fmt", "schema"), [("json", {"type": "object"}), (SCHEMA, CLOSED)])
def test_ollama_format_constrains_to_a_schema(server: Server, fmt: object, schema: dict) -> None:
    server.ollama.chat(model="echo", messages=user("{}"), format=fmt)  # type: ignore[arg-type]
    assert server.engine.requests[-1].json_schema == schema
    server.ollama.generate(model="echo", prompt="{}", format=fmt)  # type: ignore[arg-type]
    assert server.engine.requests[-1].json_schema == schema


def test_ollama_show_lists_the_tools_capability(server: Server) -> None:
    assert "tools" in (server.ollama.show("echo").capabilities or [])


@pytest.mark.parametrize(("choice", "names"), [
    ("required", ["get_weather", "get_time"]), ("get_time", ["get_time"]), ("auto", []),
])
def test_ollama_tool_choice_option_forces_a_call(server: Server, choice: str,
                                                 names: list[str]) -> None:
    server.ollama.chat(model="echo", messages=user(CALL), tools=OPENAI_TOOLS,
                       options={"tool_choice": choice})  # type: ignore[typeddict-unknown-key]
    grammar = server.engine.requests[-1].grammar or ""
    for name in ("get_weather", "get_time"):
        assert (f'"const": "{name}"' in grammar) == (name in names)


def test_ollama_tool_choice_naming_no_offered_tool_is_400(server: Server) -> None:
    response = server.http.post("/api/chat", json={
        "model": "echo", "messages": user("x"), "tools": OPENAI_TOOLS, "stream": False,
        "options": {"tool_choice": "launch"}})
    assert response.status_code == 400
    assert "options.tool_choice" in response.json()["error"]
