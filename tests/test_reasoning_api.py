"""Reasoning and the MoE families' call formats through the official openai, anthropic and
ollama clients, against a real uvicorn server. The echo engine (a test double, not a model)
"generates" the user's turn one character a token, so a test writes the exact output a Qwen3-
or gpt-oss-style model would, and every tag spans many chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest
from echo_engine import ECHO_MODEL, EchoEngine
from test_reasoning import GPT_OSS, QWEN3
from test_tools_api import Server, serve

from agent.engine import ModelInfo, ModelNotFound

MODELS = {
    "qwen3": msgspec.structs.replace(ECHO_MODEL, name="qwen3", chat_template=QWEN3,
                                     context_length=4096),
    "gpt-oss": msgspec.structs.replace(ECHO_MODEL, name="gpt-oss", chat_template=GPT_OSS,
                                       context_length=4096),
}

THOUGHT = "The user asks for the capital of France."
ANSWER = "The capital of France is Paris."
QWEN3_REPLY = f"<think> {THOUGHT} </think>  {ANSWER}"  # the echo reply ends at a newline
HARMONY_REPLY = (f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant"
                 f"<|channel|>final<|message|>{ANSWER}")
QWEN3_CALL = ('<think>I need the weather.</think><tool_call>{"name": "get_weather", '
              '"arguments": {"city": "Paris"}}</tool_call>')
HARMONY_CALL = ("<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant"
                "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                '{"city": "Paris"}<|call|>')
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


class ReasoningEcho(EchoEngine):
    """Echo models whose chat templates are Qwen3's and gpt-oss's (excerpts)."""

    def list_models(self) -> list[ModelInfo]:
        return list(MODELS.values())

    def get_model(self, name: str) -> ModelInfo:
        if name not in MODELS:
            raise ModelNotFound(name)
        return MODELS[name]

    async def tool_format(self, model: str):  # type: ignore[no-untyped-def]
        return "harmony" if self.get_model(model).name == "gpt-oss" else "hermes"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serve(ReasoningEcho())


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


REPLIES = [("qwen3", QWEN3_REPLY), ("gpt-oss", HARMONY_REPLY)]
CALLS = [("qwen3", QWEN3_CALL), ("gpt-oss", HARMONY_CALL)]


# --- OpenAI: reasoning_content on the message and in deltas ----------------------------------


@pytest.mark.parametrize(("model", "reply"), REPLIES)
def test_openai_reasoning_content_is_apart_from_the_answer(server: Server, model: str,
                                                           reply: str) -> None:
    message = server.openai.chat.completions.create(model=model,
                                                    messages=user(reply)).choices[0].message
    assert message.content == ANSWER
    assert (message.model_extra or {})["reasoning_content"] == THOUGHT
    chunks = list(server.openai.chat.completions.create(model=model, messages=user(reply),
                                                        stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join((d.model_extra or {}).get("reasoning_content") or ""
                   for d in deltas) == THOUGHT
    assert sum(1 for d in deltas if (d.model_extra or {}).get("reasoning_content")) > 1


@pytest.mark.parametrize(("model", "reply"), CALLS)
def test_openai_reasoning_beside_a_tool_call(server: Server, model: str, reply: str) -> None:
    for stream in (False, True):
        if stream:
            chunks = list(server.openai.chat.completions.create(
                model=model, messages=user(reply), tools=[TOOL], stream=True))  # type: ignore[list-item]
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            content = "".join(d.content or "" for d in deltas)
            thought = "".join((d.model_extra or {}).get("reasoning_content") or ""
                              for d in deltas)
            calls = [t for d in deltas for t in d.tool_calls or []]
            name = calls[0].function.name  # type: ignore[union-attr]
            arguments = "".join(t.function.arguments or "" for t in calls)  # type: ignore[union-attr]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            choice = server.openai.chat.completions.create(
                model=model, messages=user(reply), tools=[TOOL]).choices[0]  # type: ignore[list-item]
            message = choice.message
            content, thought = message.content or "", (message.model_extra or {}).get(
                "reasoning_content")
            name = message.tool_calls[0].function.name  # type: ignore[index,union-attr]
            arguments = message.tool_calls[0].function.arguments  # type: ignore[index,union-attr]
            assert choice.finish_reason == "tool_calls"
        assert (content, thought, name) == ("", "I need the weather.", "get_weather")
        assert json.loads(arguments) == {"city": "Paris"}


def test_openai_a_replayed_reasoning_turn_is_accepted(server: Server) -> None:
    reply = server.openai.chat.completions.create(model="qwen3", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},  # type: ignore[misc,list-item]
        {"role": "user", "content": "Paris"}])
    assert reply.choices[0].message.content == "Paris"
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})


def test_openai_schema_output_is_never_read_as_reasoning(server: Server) -> None:
    message = server.openai.chat.completions.create(
        model="qwen3", messages=user('{"a": 1}'),
        response_format={"type": "json_object"}).choices[0].message
    assert message.content == '{"a": 1}'


# --- Anthropic: thinking blocks and thinking_delta events ----------------------------------


@pytest.mark.parametrize(("model", "reply"), REPLIES)
def test_anthropic_thinking_blocks_when_enabled(server: Server, model: str, reply: str) -> None:
    enabled = {"type": "enabled", "budget_tokens": 1024}
    message = server.anthropic.messages.create(model=model, max_tokens=500, messages=user(reply),  # type: ignore[arg-type]
                                               thinking=enabled)  # type: ignore[arg-type]
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THOUGHT  # type: ignore[union-attr]
    assert message.content[0].signature  # type: ignore[union-attr]
    assert message.content[1].text == ANSWER  # type: ignore[union-attr]
    with server.anthropic.messages.stream(model=model, max_tokens=500, messages=user(reply),  # type: ignore[arg-type]
                                          thinking=enabled) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THOUGHT  # type: ignore[union-attr]
    assert final.content[1].text == ANSWER  # type: ignore[union-attr]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas.count("signature_delta") == 1 and "thinking_delta" in deltas
    # The next turn sends the thinking block back, as clients do.
    again = server.anthropic.messages.create(model=model, max_tokens=500, messages=[  # type: ignore[arg-type]
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": "Paris"}])
    assert [b.type for b in again.content] == ["text"]


@pytest.mark.parametrize(("model", "reply"), REPLIES)
def test_anthropic_without_thinking_returns_only_the_answer(server: Server, model: str,
                                                            reply: str) -> None:
    message = server.anthropic.messages.create(model=model, max_tokens=500, messages=user(reply))  # type: ignore[arg-type]
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", ANSWER)]
    with server.anthropic.messages.stream(model=model, max_tokens=500,
                                          messages=user(reply)) as stream:  # type: ignore[arg-type]
        assert stream.get_final_message().content[0].text == ANSWER  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "reply"), CALLS)
def test_anthropic_thinking_then_tool_use(server: Server, model: str, reply: str) -> None:
    tool = {"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}  # type: ignore[index]
    with server.anthropic.messages.stream(model=model, max_tokens=500, messages=user(reply),  # type: ignore[arg-type]
                                          tools=[tool],  # type: ignore[list-item]
                                          thinking={"type": "enabled", "budget_tokens": 1024},
                                          ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"


# --- Ollama: thinking on the message -------------------------------------------------------


@pytest.mark.parametrize(("model", "reply"), REPLIES)
def test_ollama_thinking_on_the_message(server: Server, model: str, reply: str) -> None:
    message = server.ollama.chat(model=model, messages=user(reply)).message
    assert (message.thinking, message.content) == (THOUGHT, ANSWER)
    parts = list(server.ollama.chat(model=model, messages=user(reply), stream=True, think=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    hidden = server.ollama.chat(model=model, messages=user(reply), think=False).message
    assert (hidden.thinking, hidden.content) == (None, ANSWER)
    generated = server.ollama.generate(model=model, prompt=reply)
    assert (generated.thinking, generated.response) == (THOUGHT, ANSWER)


def test_ollama_show_lists_thinking_for_models_that_reason(server: Server) -> None:
    assert "thinking" in (server.ollama.show("qwen3").capabilities or [])


@pytest.mark.parametrize(("model", "reply"), CALLS)
def test_ollama_thinking_then_a_call(server: Server, model: str, reply: str) -> None:
    message = server.ollama.chat(model=model, messages=user(reply), tools=[TOOL]).message  # type: ignore[list-item]
    assert message.thinking == "I need the weather."
    assert message.tool_calls and message.tool_calls[0].function.name == "get_weather"
    assert dict(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert not message.content
