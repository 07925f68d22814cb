"""The Ollama API over HTTP: the official `ollama` client and raw httpx against a real uvicorn
server backed by EchoEngine (a test double: these pin wire shapes, not model output)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import ollama
import pytest
from echo_engine import ECHO_MODEL, EchoEngine, decode, running_server

from agent import __version__
from agent.api.app import create_app
from agent.settings import NodeSettings


@dataclass
class Server:
    url: str
    engine: EchoEngine
    client: ollama.Client
    http: httpx.Client


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = EchoEngine()
    app = create_app(engine, NodeSettings(), pull=engine.pull)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield Server(url, engine, ollama.Client(host=url), http)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_chat_returns_one_object_with_counts_and_durations(server: Server) -> None:
    reply = server.client.chat(model="echo", messages=user("Hello"))
    request = server.engine.requests[-1]
    assert reply.message.role == "assistant"
    assert reply.message.content == "Hello"
    assert reply.done is True
    assert reply.done_reason == "stop"
    assert reply.prompt_eval_count == len(request.prompt_tokens)
    assert reply.eval_count == 5
    for duration in (reply.total_duration, reply.load_duration, reply.prompt_eval_duration,
                     reply.eval_duration):
        assert isinstance(duration, int)
        assert duration >= 0
    assert reply.total_duration >= reply.eval_duration  # type: ignore[operator]
    assert reply.created_at.endswith("Z")  # type: ignore[union-attr]


def test_chat_streams_ndjson_by_default(server: Server) -> None:
    response = server.http.post("/api/chat", json={"model": "echo", "messages": user("abc")})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    objects = ndjson(response)
    assert [o["message"]["content"] for o in objects] == ["a", "b", "c", ""]
    assert [o["done"] for o in objects] == [False, False, False, True]
    assert objects[-1]["done_reason"] == "stop"
    assert objects[-1]["eval_count"] == 3


def test_chat_stream_through_the_client(server: Server) -> None:
    parts = list(server.client.chat(model="echo", messages=user("stream me"), stream=True))
    assert "".join(p.message.content or "" for p in parts) == "stream me"
    assert parts[-1].done


def test_generate_templates_the_prompt_with_the_system(server: Server) -> None:
    reply = server.client.generate(model="echo", prompt="Why?", system="Be wise.")
    assert reply.response == "Why?"
    assert decode(server.engine.requests[-1].prompt_tokens) == (
        "<|system|>Be wise.\n<|user|>Why?\n<|assistant|>")
    parts = list(server.client.generate(model="echo", prompt="ab", stream=True))
    assert [p.response for p in parts] == ["a", "b", ""]


def test_generate_raw_skips_the_template(server: Server) -> None:
    reply = server.client.generate(model="echo", prompt="raw text", raw=True)
    assert server.engine.requests[-1].prompt_tokens == [ord(c) for c in "raw text"]
    assert reply.response == "raw text"


def test_options_reach_the_engine(server: Server) -> None:
    server.client.chat(model="echo", messages=user("x"), options={
        "temperature": 0, "top_p": 0.8, "top_k": 30, "min_p": 0.1, "seed": 3, "num_predict": 5,
        "stop": ["\n"], "repeat_penalty": 1.2, "repeat_last_n": 32, "presence_penalty": 0.3,
        "frequency_penalty": 0.4, "num_ctx": 128}, keep_alive="5m")
    params = server.engine.requests[-1].sampling
    assert params.greedy
    assert (params.top_p, params.top_k, params.min_p, params.seed) == (0.8, 30, 0.1, 3)
    assert (params.max_tokens, params.stop) == (5, ("\n",))
    assert (params.repetition_penalty, params.repetition_context) == (1.2, 32)
    assert (params.presence_penalty, params.frequency_penalty) == (0.3, 0.4)


def test_default_temperature_is_ollamas(server: Server) -> None:
    server.client.chat(model="echo", messages=user("x"))
    assert server.engine.requests[-1].sampling.temperature == 0.8


def test_num_predict_cuts_with_done_reason_length(server: Server) -> None:
    reply = server.client.generate(model="echo", prompt="abcdef", options={"num_predict": 2})
    assert (reply.response, reply.done_reason) == ("ab", "length")


def test_num_ctx_limits_the_window(server: Server) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        server.client.generate(model="echo", prompt="x" * 40, options={"num_ctx": 32})
    assert err.value.status_code == 400
    assert "32" in err.value.error


def test_logprobs(server: Server) -> None:
    reply = server.client.chat(model="echo", messages=user("ok"), logprobs=True, top_logprobs=2)
    assert [lp.token for lp in reply.logprobs] == ["o", "k"]  # type: ignore[union-attr]
    assert [t.token for t in reply.logprobs[0].top_logprobs] == ["o", "?"]  # type: ignore[index,union-attr]


def test_empty_prompt_or_messages_just_load_the_model(server: Server) -> None:
    before = len(server.engine.requests)
    assert server.client.generate(model="echo", prompt="").done_reason == "load"
    assert server.client.chat(model="echo", messages=[]).done_reason == "load"
    assert len(server.engine.requests) == before


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/api/chat", {"options": {"mirostat": 2}}, "options.mirostat"),
    ("/api/chat", {"format": "yaml"}, "format"),
    ("/api/chat", {"format": {"type": "object", "required": 3}}, "format"),
    ("/api/chat", {"think": True}, "think"),
    ("/api/chat", {"tools": [{"type": "function"}]}, "tools"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "messages[0].images"),
    ("/api/chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/api/chat", {"options": {"num_predict": 0}}, "num_predict"),
    ("/api/chat", {"options": {"num_ctx": 100000}}, "num_ctx"),
    ("/api/chat", {"options": {"temperature": -1}}, "options.temperature"),
    ("/api/chat", {"model": ""}, "model"),
    ("/api/generate", {"prompt": "x", "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/api/generate", {"prompt": "x", "context": [1, 2]}, "context"),
    ("/api/generate", {"prompt": "x", "raw": True, "system": "s"}, "system"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(server: Server, path: str, body: dict,
                                                       needle: str) -> None:
    payload = {"model": "echo", "stream": False, **body}
    if path == "/api/chat":
        payload.setdefault("messages", user("x"))
    response = server.http.post(path, json=payload)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert needle in response.json()["error"]


def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        server.client.chat(model="nope", messages=user("x"))
    assert err.value.status_code == 404


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_503_with_retry_after(server: Server, stream: bool) -> None:
    response = server.http.post("/api/chat", json={"model": "echo", "stream": stream,
                                                   "messages": user("[overloaded]")})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "error" in response.json()


def test_failure_mid_stream_is_an_error_line(server: Server) -> None:
    response = server.http.post("/api/generate", json={"model": "echo",
                                                       "prompt": "abcdef [break]"})
    objects = ndjson(response)
    assert objects[-1] == {"error": "echo runner broke"}
    with pytest.raises(ollama.ResponseError):
        list(server.client.generate(model="echo", prompt="abcdef [crash]", stream=True))


def test_malformed_json_is_an_ollama_400(server: Server) -> None:
    response = server.http.post("/api/chat", content=b"{not json")
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


def test_tags_show_ps_version(server: Server) -> None:
    tags = server.client.list()
    assert [m.model for m in tags.models] == ["echo"]
    assert tags.models[0].size == ECHO_MODEL.size_bytes
    assert tags.models[0].details.family == "llama"  # type: ignore[union-attr]
    shown = server.client.show("echo")
    assert shown.modelinfo["llama.context_length"] == ECHO_MODEL.context_length  # type: ignore[index]
    assert shown.template == ECHO_MODEL.chat_template
    with pytest.raises(ollama.ResponseError) as err:
        server.client.show("nope")
    assert err.value.status_code == 404
    running = server.client.ps()
    assert [m.model for m in running.models] == ["echo"]
    assert running.models[0].context_length == ECHO_MODEL.context_length
    assert server.http.get("/api/version").json() == {"version": __version__}


def test_pull_streams_status_lines_and_reports_failures(server: Server) -> None:
    statuses = [p.status for p in server.client.pull("echo", stream=True)]
    assert statuses[0] == "pulling echo"
    assert statuses[-1] == "success"
    assert server.client.pull("echo").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        server.client.pull("nope")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        server.client.pull("broken")
    assert "network unreachable" in err.value.error
    with pytest.raises(ollama.ResponseError):
        list(server.client.pull("broken", stream=True))


def test_pull_without_a_puller_is_501() -> None:
    with running_server(create_app(EchoEngine(), NodeSettings())) as url:
        response = httpx.post(f"{url}/api/pull", json={"model": "echo"})
    assert response.status_code == 501
    assert "pull" in response.json()["error"]


def test_unknown_api_route_answers_in_ollama_format(server: Server) -> None:
    response = server.http.post("/api/embed", json={"model": "echo", "input": "x"})
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_root_answers_the_ollama_heartbeat(server: Server) -> None:
    assert server.http.head("/").status_code == 200
    assert server.http.get("/").text == "flock is running"


@pytest.mark.parametrize(("last_n", "penalty", "context"), [
    (-1, 1.2, 256),  # the whole context (the echo model's)
    (0, 1.0, 1),  # switched off
    (None, 1.2, 64),  # Ollama's default window
])
def test_repeat_last_n_minus_one_is_the_whole_context_and_zero_disables(
        server: Server, last_n: int | None, penalty: float, context: int) -> None:
    options: dict = {"repeat_penalty": 1.2}
    if last_n is not None:
        options["repeat_last_n"] = last_n
    server.client.chat(model="echo", messages=user("x"), options=options)
    params = server.engine.requests[-1].sampling
    assert (params.repetition_penalty, params.repetition_context) == (penalty, context)
