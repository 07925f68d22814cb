"""The OpenAI API over HTTP: the official `openai` client and raw httpx against a real uvicorn
server backed by EchoEngine (a test double: these pin wire shapes, not model output)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from echo_engine import ECHO_MODEL, EchoEngine, decode, running_server

from agent.api.app import create_app
from agent.settings import NodeSettings


@dataclass
class Server:
    url: str
    engine: EchoEngine
    client: openai.OpenAI
    http: httpx.Client


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = EchoEngine()
    app = create_app(engine, NodeSettings(max_tokens_default=2048))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield Server(url, engine, client, http)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(server: Server, body: object, path: str = "/v1/chat/completions") -> httpx.Response:
    return server.http.post(path, json=body)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- chat completions -----------------------------------------------------------------------


def test_chat_completion_returns_the_text_and_exact_usage(server: Server) -> None:
    reply = server.client.chat.completions.create(model="echo", messages=user("Hello there"))
    request = server.engine.requests[-1]
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "echo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(request.prompt_tokens)
    assert reply.usage.completion_tokens == len("Hello there")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 11


def test_chat_messages_reach_the_template_in_order(server: Server) -> None:
    server.client.chat.completions.create(model="echo", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ])
    prompt = decode(server.engine.requests[-1].prompt_tokens)
    assert prompt == ("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n"
                      "<|user|>Again\n<|assistant|>")


def test_chat_stream_chunks_then_usage_then_done(server: Server) -> None:
    chunks = list(server.client.chat.completions.create(
        model="echo", messages=user("Hey"), stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hey"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_wire_format_ends_with_done(server: Server) -> None:
    with server.http.stream("POST", "/v1/chat/completions",
                            json={"model": "echo", "messages": user("ab"), "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_and_max_tokens_end_the_completion(server: Server) -> None:
    stopped = server.client.chat.completions.create(
        model="echo", messages=user("one, two. three"), stop=[".", "!"])
    assert stopped.choices[0].message.content == "one, two"
    assert stopped.choices[0].finish_reason == "stop"
    single = server.client.chat.completions.create(
        model="echo", messages=user("one, two"), stop=",")
    assert single.choices[0].message.content == "one"
    cut = server.client.chat.completions.create(
        model="echo", messages=user("abcdef"), max_completion_tokens=3)
    assert cut.choices[0].message.content == "abc"
    assert cut.choices[0].finish_reason == "length"
    assert server.client.chat.completions.create(
        model="echo", messages=user("abcdef"), max_tokens=2).choices[0].message.content == "ab"


def test_sampling_fields_reach_the_engine(server: Server) -> None:
    server.client.chat.completions.create(
        model="echo", messages=user("x"), temperature=0, top_p=0.5, seed=42,
        presence_penalty=0.1, frequency_penalty=0.2, user="someone",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    params = server.engine.requests[-1].sampling
    assert params.greedy
    assert (params.top_p, params.seed, params.top_k, params.min_p) == (0.5, 42, 20, 0.05)
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, 0.2)
    assert params.repetition_penalty == 1.1


def test_defaults_are_temperature_one_and_the_context_left(server: Server) -> None:
    server.client.chat.completions.create(model="echo", messages=user("x"))
    request = server.engine.requests[-1]
    assert request.sampling.temperature == 1.0
    # max_tokens_default (2048) is capped by what the 256-token context leaves.
    assert request.sampling.max_tokens == ECHO_MODEL.context_length - len(request.prompt_tokens)


def test_logprobs_in_the_response_and_in_chunks(server: Server) -> None:
    reply = server.client.chat.completions.create(
        model="echo", messages=user("ok"), logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == ["o", "k"]
    assert content[0].bytes == [ord("o")]
    assert [t.token for t in content[0].top_logprobs] == ["o", "?"]
    chunks = list(server.client.chat.completions.create(
        model="echo", messages=user("ok"), logprobs=True, stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == ["o", "k"]


def test_harmless_metadata_is_accepted(server: Server) -> None:
    reply = post(server, {"model": "echo", "messages": user("m"), "user": "u", "store": False,
                          "metadata": {"k": "v"}, "service_tier": "auto", "tools": [],
                          "parallel_tool_calls": True, "n": 1})
    assert reply.status_code == 200


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"frobnicate": True}, "frobnicate"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
     "response_format.json_schema.schema"),
    ({"stop": ""}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "mood": "sad"}]}, "messages[0].mood"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
])
def test_bad_fields_are_400_naming_the_field(server: Server, body: dict, param: str) -> None:
    response = post(server, {"model": "echo", "messages": user("x"), **body})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0].split("[")[0] in error["message"] or error["param"] == param


def test_missing_model_field_is_400(server: Server) -> None:
    response = post(server, {"messages": user("x")})
    assert response.status_code == 400
    assert error_of(response)["param"] == "model"


def test_n_above_one_raises_bad_request_in_the_client(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model="echo", messages=user("x"), n=2)
    assert err.value.body["param"] == "n"  # type: ignore[index]


@pytest.mark.parametrize("body", [b"{bad json", b"\xff\xfe{}", b"", b"[1, 2]", b"null"])
def test_malformed_bodies_are_400(server: Server, body: bytes) -> None:
    response = server.http.post("/v1/chat/completions", content=body,
                                headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_invalid_utf8_inside_a_string_is_400(server: Server) -> None:
    body = b'{"model": "echo", "messages": [{"role": "user", "content": "\xc3\x28"}]}'
    response = server.http.post("/v1/chat/completions", content=body)
    assert response.status_code == 400


def test_unknown_model_is_404_model_not_found(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        server.client.chat.completions.create(model="nope", messages=user("x"))
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert err.value.body["param"] == "model"  # type: ignore[index]


def test_prompt_longer_than_the_context_is_400_with_counts(server: Server) -> None:
    response = post(server, {"model": "echo", "messages": user("x" * 400)})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]
    assert "422" in error["message"]  # 400 characters plus the template's 22


def test_template_rejection_is_400(server: Server) -> None:
    response = post(server, {"model": "echo", "messages": user("TEMPLATE_ERROR")})
    assert response.status_code == 400
    assert "template" in error_of(response)["message"]


# --- engine failures ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_429_with_retry_after(server: Server, stream: bool) -> None:
    response = post(server, {"model": "echo", "messages": user("[overloaded]"), "stream": stream})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert error_of(response)["code"] == "overloaded"


def test_engine_refusals_map_to_their_statuses(server: Server) -> None:
    assert post(server, {"model": "echo", "messages": user("[bad_request]")}).status_code == 400
    assert post(server, {"model": "echo", "messages": user("[not_found]")}).status_code == 404
    broken = post(server, {"model": "echo", "messages": user("abcdef [break]")})
    assert broken.status_code == 500
    assert error_of(broken)["type"] == "server_error"


@pytest.mark.parametrize("marker", ["[break]", "[crash]"])
def test_failure_mid_stream_is_an_error_chunk(server: Server, marker: str) -> None:
    with pytest.raises(openai.APIError):
        for _ in server.client.chat.completions.create(
                model="echo", messages=user(f"abcdef {marker}"), stream=True):
            pass


# --- completions ----------------------------------------------------------------------------


def test_completion_from_text_and_from_tokens(server: Server) -> None:
    text = server.client.completions.create(model="echo", prompt="Once upon")
    assert text.object == "text_completion"
    assert text.choices[0].text == "Once upon"
    assert text.usage is not None
    assert text.usage.prompt_tokens == len("Once upon")
    tokens = server.client.completions.create(model="echo", prompt=[ord("h"), ord("i")])
    assert tokens.choices[0].text == "hi"
    assert server.engine.requests[-1].prompt_tokens == [ord("h"), ord("i")]


def test_completion_stream_and_logprobs(server: Server) -> None:
    chunks = list(server.client.completions.create(
        model="echo", prompt="abc", stream=True, logprobs=2, max_tokens=2,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "ab"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    offsets = [c.choices[0].logprobs.text_offset[0] for c in chunks
               if c.choices and c.choices[0].logprobs]
    assert offsets == [0, 1]
    whole = server.client.completions.create(model="echo", prompt="abc", logprobs=1)
    assert whole.choices[0].logprobs.tokens == ["a", "b", "c"]
    assert whole.choices[0].logprobs.top_logprobs == [{"a": -0.25}, {"b": -0.25}, {"c": -0.25}]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "logprobs": 9}, "logprobs"),
    ({"prompt": ""}, "prompt"),
])
def test_completion_rejections(server: Server, body: dict, param: str) -> None:
    response = post(server, {"model": "echo", **body}, "/v1/completions")
    assert response.status_code == 400
    assert error_of(response)["param"] == param


# --- models and routing ---------------------------------------------------------------------


def test_models_list_and_retrieve(server: Server) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["echo"]
    assert models.data[0].owned_by == "flock"
    assert server.client.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("nope")


def test_unknown_route_and_method_answer_in_openai_format(server: Server) -> None:
    missing = server.http.post("/v1/embeddings", json={})
    assert missing.status_code == 404
    assert "/v1/embeddings" in error_of(missing)["message"]
    wrong = server.http.get("/v1/chat/completions")
    assert wrong.status_code == 405
    error_of(wrong)


def test_system_fingerprint_is_a_string_in_responses_and_chunks(server: Server) -> None:
    """OpenAI's schema types it as a string; null failed a strict client check."""
    reply = server.client.chat.completions.create(model="echo", messages=user("Hi"))
    assert isinstance(reply.system_fingerprint, str) and reply.system_fingerprint
    chunks = list(server.client.chat.completions.create(
        model="echo", messages=user("Hi"), stream=True, stream_options={"include_usage": True}))
    assert {c.system_fingerprint for c in chunks} == {reply.system_fingerprint}
    legacy = server.client.completions.create(model="echo", prompt="Hi")
    assert legacy.system_fingerprint == reply.system_fingerprint
    raw = post(server, {"model": "echo", "messages": user("Hi"), "stream": True}).text
    assert '"system_fingerprint":null' not in raw


def test_json_object_with_a_schema_constrains_to_that_schema(server: Server) -> None:
    """instructor's JSON_SCHEMA mode (and vLLM's extension): the schema beside json_object."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    server.client.chat.completions.create(
        model="echo", messages=user('{"name": "x"}'),
        response_format={"type": "json_object", "schema": schema})  # type: ignore[arg-type,typeddict-unknown-key]
    assert server.engine.requests[-1].json_schema == schema
    response = post(server, {"model": "echo", "messages": user("x"),
                             "response_format": {"type": "json_object", "schema": 3}})
    assert response.status_code == 400
    assert error_of(response)["param"] == "response_format.schema"
