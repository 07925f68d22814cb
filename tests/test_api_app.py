"""The app around the adapters: probes, API keys, CORS, the body limit, the OpenAPI schema and
cancellation on client disconnect, over a real uvicorn server backed by EchoEngine."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest
from echo_engine import EchoEngine, running_server, wait_until

from agent.api.app import create_app
from agent.settings import NodeSettings

USER = [{"role": "user", "content": "hi"}]


# --- probes ---------------------------------------------------------------------------------


def test_healthz_and_readyz_follow_ready() -> None:
    state = {"ready": False}
    app = create_app(EchoEngine(), NodeSettings(), ready=lambda: state["ready"])
    with running_server(app) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        starting = httpx.get(f"{url}/readyz")
        assert starting.status_code == 503
        state["ready"] = True
        assert httpx.get(f"{url}/readyz").status_code == 200


# --- API keys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    app = create_app(EchoEngine(), NodeSettings(api_keys=["sekrit", "other"]))
    with running_server(app) as url:
        yield url


def test_missing_or_wrong_keys_are_401_in_each_format(keyed_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as oai_err:
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong", max_retries=0) \
            .chat.completions.create(model="echo", messages=USER)  # type: ignore[arg-type]
    assert oai_err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError) as anth_err:
        anthropic.Anthropic(base_url=keyed_url, api_key="wrong", max_retries=0) \
            .messages.create(model="echo", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert anth_err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as oll_err:
        ollama.Client(host=keyed_url).chat(model="echo", messages=USER)
    assert oll_err.value.status_code == 401
    assert httpx.get(f"{keyed_url}/v1/models").json()["error"]["type"] == "invalid_request_error"


def test_right_keys_pass_as_bearer_or_x_api_key(keyed_url: str) -> None:
    reply = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sekrit") \
        .chat.completions.create(model="echo", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "hi"
    message = anthropic.Anthropic(base_url=keyed_url, api_key="other") \
        .messages.create(model="echo", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert message.content[0].text == "hi"  # type: ignore[union-attr]
    client = ollama.Client(host=keyed_url, headers={"Authorization": "Bearer sekrit"})
    assert client.chat(model="echo", messages=USER).message.content == "hi"


def test_probes_and_schema_need_no_key(keyed_url: str) -> None:
    assert httpx.get(f"{keyed_url}/healthz").status_code == 200
    assert httpx.get(f"{keyed_url}/schema/openapi.json").status_code == 200


# --- body limit, CORS, schema ---------------------------------------------------------------


def test_oversized_bodies_are_413_in_each_format() -> None:
    app = create_app(EchoEngine(), NodeSettings(max_body_bytes=4096))
    big = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "x" * 8000}]})
    with running_server(app) as url:
        oai = httpx.post(f"{url}/v1/chat/completions", content=big)
        assert oai.status_code == 413
        assert oai.json()["error"]["code"] == "request_too_large"
        anth = httpx.post(f"{url}/v1/messages", content=big)
        assert anth.status_code == 413
        assert anth.json()["error"]["type"] == "request_too_large"
        oll = httpx.post(f"{url}/api/chat", content=big)
        assert oll.status_code == 413
        assert set(oll.json()) == {"error"}

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
            yield big.encode()

        chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks())
        assert chunked.status_code == 413


def test_cors_allows_the_configured_origins() -> None:
    app = create_app(EchoEngine(), NodeSettings(cors_origins=["http://ui.example"],
                                                api_keys=["k"]))
    with running_server(app) as url:
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        other = httpx.get(f"{url}/healthz", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_openapi_schema_describes_every_api() -> None:
    with running_server(create_app(EchoEngine(), NodeSettings())) as url:
        schema = httpx.get(f"{url}/schema/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                 "/v1/messages/count_tokens", "/api/chat", "/api/generate", "/api/tags",
                 "/api/show", "/api/ps", "/api/version", "/api/pull", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    components = schema["components"]["schemas"]
    assert {"ChatCompletionRequest", "MessagesRequest", "ChatRequest"} <= set(components)


def test_a_body_without_a_json_content_type_is_still_read() -> None:
    # `curl -d` sends application/x-www-form-urlencoded; the body is JSON all the same.
    with running_server(create_app(EchoEngine(), NodeSettings())) as url:
        response = httpx.post(f"{url}/v1/chat/completions",
                              content=json.dumps({"model": "echo", "messages": USER}),
                              headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


# --- client disconnect ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow() -> Iterator[tuple[str, EchoEngine]]:
    engine = EchoEngine(token_delay=0.05)
    with running_server(create_app(engine, NodeSettings(), pull=engine.pull)) as url:
        yield url, engine


SLOW_BODIES = {
    "/v1/chat/completions": {"model": "echo", "messages": [{"role": "user", "content": "[slow]"}]},
    "/v1/completions": {"model": "echo", "prompt": "[slow]"},
    "/v1/messages": {"model": "echo", "max_tokens": 200,
                     "messages": [{"role": "user", "content": "[slow]"}]},
    "/api/chat": {"model": "echo", "messages": [{"role": "user", "content": "[slow]"}]},
    "/api/generate": {"model": "echo", "prompt": "[slow]"},
}


@pytest.mark.parametrize("path", list(SLOW_BODIES))
def test_disconnect_mid_stream_cancels_the_generation(slow: tuple[str, EchoEngine],
                                                      path: str) -> None:
    url, engine = slow
    body = {**SLOW_BODIES[path], "stream": True}
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", f"{url}{path}", json=body) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
        rid = engine.requests[-1].id
    # Leaving the block closed the connection; the engine stream must be closed, unfinished.
    assert wait_until(lambda: rid in engine.cancelled), "generation was not cancelled"


@pytest.mark.parametrize("path", list(SLOW_BODIES))
def test_disconnect_while_waiting_for_a_whole_response_cancels_it(
        slow: tuple[str, EchoEngine], path: str) -> None:
    url, engine = slow
    before = len(engine.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}{path}", json={**SLOW_BODIES[path], "stream": False}, timeout=0.5)
    assert wait_until(lambda: len(engine.requests) > before)
    rid = engine.requests[-1].id
    assert wait_until(lambda: rid in engine.cancelled), "generation was not cancelled"


# --- metrics --------------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") or series == name:
            got = series[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == wanted:
                return float(value)
    return 0.0


def test_requests_rejections_and_tokens_are_counted() -> None:
    from agent.metrics import FlockMetrics

    engine = EchoEngine(token_delay=0.05)
    app = create_app(engine, NodeSettings(), metrics=FlockMetrics())
    with running_server(app) as url:
        body = {"model": "echo", "messages": USER}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        assert httpx.post(f"{url}/api/chat", json={**body, "stream": True}).status_code == 200
        httpx.post(f"{url}/v1/chat/completions", json={**body, "n": 3})
        httpx.post(f"{url}/v1/messages", json={
            "model": "echo", "max_tokens": 5,
            "messages": [{"role": "user", "content": "[overloaded]"}]})
        httpx.post(f"{url}/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "x" * 300}]})
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={
                "model": "echo", "stream": True,
                "messages": [{"role": "user", "content": "[slow]"}]}) as response:
            next(response.iter_bytes())
        assert wait_until(lambda: len(engine.cancelled) == 1)
        scrape = httpx.get(f"{url}/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    assert _sample(text, "flock_requests_total", api="openai", model="echo", status="2xx") == 1
    assert _sample(text, "flock_requests_total", api="ollama", model="echo", status="2xx") == 1
    assert _sample(text, "flock_requests_total", api="anthropic", model="echo",
                   status="5xx") == 1  # 529
    assert _sample(text, "flock_requests_total", api="openai", model="echo", status="4xx") == 1
    assert _sample(text, "flock_rejections_total", reason="bad_request") == 1
    assert _sample(text, "flock_rejections_total", reason="overloaded") == 1
    assert _sample(text, "flock_rejections_total", reason="too_long") == 1
    assert _sample(text, "flock_generated_tokens_total", model="echo") >= 4


def test_metrics_endpoint_is_404_when_metrics_are_off() -> None:
    with running_server(create_app(EchoEngine(), NodeSettings())) as url:
        assert httpx.get(f"{url}/metrics").status_code == 404
