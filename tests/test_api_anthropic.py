"""The Anthropic Messages API over HTTP: the official `anthropic` client and raw httpx against a
real uvicorn server backed by EchoEngine (a test double: these pin wire shapes, not output)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import httpx
import pytest
from echo_engine import EchoEngine, decode, running_server

from agent.api.app import create_app
from agent.settings import NodeSettings


@dataclass
class Server:
    url: str
    engine: EchoEngine
    client: anthropic.Anthropic
    http: httpx.Client


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = EchoEngine()
    with running_server(create_app(engine, NodeSettings())) as url, \
            httpx.Client(base_url=url, timeout=10) as http:
        yield Server(url, engine, anthropic.Anthropic(base_url=url, api_key="unused",
                                                      max_retries=0), http)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(server: Server, body: dict, path: str = "/v1/messages") -> httpx.Response:
    return server.http.post(path, json={"model": "echo", "max_tokens": 100, **body})


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    return body["error"]


def test_message_with_text_stop_reason_and_usage(server: Server) -> None:
    message = server.client.messages.create(model="echo", max_tokens=100,
                                            messages=user("Hello world"))
    request = server.engine.requests[-1]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [block.text for block in message.content] == ["Hello world"]  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.usage.input_tokens == len(request.prompt_tokens)
    assert message.usage.output_tokens == len("Hello world")


def test_stop_sequences_and_max_tokens(server: Server) -> None:
    stopped = server.client.messages.create(model="echo", max_tokens=100,
                                            messages=user("one ### two"),
                                            stop_sequences=["###"])
    assert stopped.content[0].text == "one "  # type: ignore[union-attr]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "###")
    cut = server.client.messages.create(model="echo", max_tokens=3, messages=user("abcdef"))
    assert cut.stop_reason == "max_tokens"
    assert server.engine.requests[-1].sampling.max_tokens == 3


def test_system_as_string_or_blocks_and_text_blocks(server: Server) -> None:
    server.client.messages.create(
        model="echo", max_tokens=10, system="Be kind.",
        messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": [{"type": "text", "text": "c"},
                                               {"type": "text", "text": "d",
                                                "cache_control": {"type": "ephemeral"}}]}])
    assert decode(server.engine.requests[-1].prompt_tokens) == (
        "<|system|>Be kind.\n<|user|>a\n<|assistant|>b\n<|user|>c\nd\n<|assistant|>")
    server.client.messages.create(model="echo", max_tokens=10, messages=user("x"),
                                  system=[{"type": "text", "text": "S"}])
    assert decode(server.engine.requests[-1].prompt_tokens).startswith("<|system|>S\n")


def test_sampling_defaults_and_fields(server: Server) -> None:
    server.client.messages.create(model="echo", max_tokens=10, messages=user("x"))
    assert server.engine.requests[-1].sampling.temperature == 1.0
    # This client version no longer has sampling keywords; the API still takes the fields.
    server.client.messages.create(model="echo", max_tokens=10, messages=user("x"),
                                  metadata={"user_id": "u-1"}, cache_control={"type": "ephemeral"},
                                  service_tier="auto", inference_geo="eu", speed="standard",
                                  extra_body={"temperature": 0, "top_p": 0.9, "top_k": 5})
    params = server.engine.requests[-1].sampling
    assert params.greedy
    assert (params.top_p, params.top_k) == (0.9, 5)


def test_max_tokens_zero_generates_nothing(server: Server) -> None:
    before = len(server.engine.requests)
    message = server.client.messages.create(model="echo", max_tokens=0, messages=user("warm"))
    assert (message.content, message.stop_reason) == ([], "max_tokens")
    assert message.usage.output_tokens == 0
    assert len(server.engine.requests) == before


def test_stream_event_sequence_on_the_wire(server: Server) -> None:
    with server.http.stream("POST", "/v1/messages", json={
            "model": "echo", "max_tokens": 100, "stream": True, "messages": user("Hi")}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data:")]
    assert [d["type"] for d in data] == names
    assert data[0]["message"]["usage"]["input_tokens"] == len(server.engine.requests[-1]
                                                              .prompt_tokens)
    assert data[3]["delta"] == {"type": "text_delta", "text": "H"}
    assert data[6]["delta"]["stop_reason"] == "end_turn"
    assert data[6]["usage"]["output_tokens"] == 2


def test_stream_through_the_client(server: Server) -> None:
    with server.client.messages.stream(model="echo", max_tokens=4,
                                       messages=user("streaming")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "stre"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4


def test_count_tokens_matches_the_prompt(server: Server) -> None:
    counted = server.client.messages.count_tokens(model="echo", messages=user("count me"),
                                                  system="sys")
    server.client.messages.create(model="echo", max_tokens=5, messages=user("count me"),
                                  system="sys")
    assert counted.input_tokens == len(server.engine.requests[-1].prompt_tokens)


@pytest.mark.parametrize(("body", "needle"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}},
     "output_config.format.schema"),
    ({"container": "c1"}, "container"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [*user("a"), {"role": "assistant", "content": "pre"}]}, "messages[1]"),
    ({"tools": [{"name": "t"}]}, "tools[0].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "tool",
                                                                     "name": "u"}},
     "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"unknown_thing": 1}, "unknown_thing"),
])
def test_bad_requests_are_400_invalid_request_error(server: Server, body: dict,
                                                    needle: str) -> None:
    payload = {"messages": user("x"), **body}
    if payload.get("max_tokens", 1) is None:
        del payload["max_tokens"]
        response = server.http.post("/v1/messages", json={"model": "echo", **payload})
    else:
        response = post(server, payload)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


def test_malformed_json_is_an_anthropic_400(server: Server) -> None:
    response = server.http.post("/v1/messages", content=b"{nope")
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_unknown_model_is_not_found_error(server: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        server.client.messages.create(model="nope", max_tokens=5, messages=user("x"))
    assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_529_overloaded_error_with_retry_after(server: Server, stream: bool) -> None:
    response = post(server, {"messages": user("[overloaded]"), "stream": stream})
    assert response.status_code == 529
    assert response.headers["retry-after"] == "1"
    assert error_of(response)["type"] == "overloaded_error"


def test_failure_mid_stream_is_an_error_event(server: Server) -> None:
    with server.http.stream("POST", "/v1/messages", json={
            "model": "echo", "max_tokens": 100, "stream": True,
            "messages": user("abcdef [break]")}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: error"
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError):  # noqa: SIM117
        with server.client.messages.stream(model="echo", max_tokens=50,
                                           messages=user("abcdef [break]")) as stream:
            for _ in stream:
                pass


def test_unknown_messages_route_is_anthropic_404(server: Server) -> None:
    response = server.http.post("/v1/messages/batches", json={})
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"
