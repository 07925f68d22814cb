"""Hostile input against a real agent (`python -m agent run` serving a tiny random model):
schemathesis over the OpenAPI schema the agent serves at /schema, and hand-written cases for all
three APIs (invalid UTF-8, huge numbers, deep JSON, 10 MB strings, negative max tokens, unknown
roles, empty messages, wrong types, NaN/Infinity, null bytes, huge headers, too many stop
strings or messages).

What must hold: no 5xx but the deliberate overload answers; every error in the format of the
API it was sent to; the agent and its runner alive afterwards (the runner never restarted),
with /healthz and a valid request of each API answering.

Schemathesis is bounded: FLOCK_FUZZ_EXAMPLES examples per operation and generation mode
(default 25) and FLOCK_FUZZ_SECONDS in all (default 240); its examples are derandomized, so a
run is reproducible.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from live_agent import LiveAgent, start_agent
from tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

Api = Literal["openai", "anthropic", "ollama"]

OVERLOAD_STATUS: dict[Api, int] = {"openai": 429, "anthropic": 529, "ollama": 503}
ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
}
USER = [{"role": "user", "content": "hi"}]
DEEP = 10_000  # nested arrays
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    root = tmp_path_factory.mktemp("hostile")
    model = make_tiny_model(root / "tiny")
    # No discovery: agents of other tests on this host must not join (and re-place) this node.
    agent = start_agent(root / "state", model=str(model), args=["--no-discovery"])
    try:
        yield agent
    finally:
        agent.stop()


# --- judging answers ---------------------------------------------------------------------------


def api_of(path: str) -> Api:
    if path.startswith("/api/") or path == "/api":
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


def error_format_problem(api: Api, response: httpx.Response) -> str | None:
    """None when an error response has the shape its API's clients parse, else what is wrong."""
    try:
        body = response.json()
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    if api == "openai":
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, dict) and isinstance(error.get("message"), str)
                and isinstance(error.get("type"), str) and "param" in error and "code" in error):
            return f"not an OpenAI error: {body!r:.300}"
    elif api == "anthropic":
        error = body.get("error") if isinstance(body, dict) else None
        if not (body.get("type") == "error" and isinstance(error, dict)
                and error.get("type") in ANTHROPIC_ERROR_TYPES
                and isinstance(error.get("message"), str)):
            return f"not an Anthropic error: {body!r:.300}"
    elif not (isinstance(body, dict) and isinstance(body.get("error"), str)):
        return f"not an Ollama error: {body!r:.300}"
    return None


def answer_problem(api: Api, response: httpx.Response) -> str | None:
    """None for an acceptable answer to hostile input: a success, a 4xx in the API's format, or
    the API's deliberate overload answer with Retry-After."""
    status = response.status_code
    if status < 400:
        return None
    if status >= 500 and status != OVERLOAD_STATUS[api]:
        return f"server error {status}: {response.text[:300]!r}"
    if status == OVERLOAD_STATUS[api] and "retry-after" not in response.headers:
        return f"overloaded ({status}) without Retry-After"
    return error_format_problem(api, response)


# --- hand-written cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    expect: frozenset[int]  # acceptable statuses
    content_type: str = "application/json"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def hand_written_cases(model: str) -> list[Case]:
    m = json.dumps(model)
    bad = frozenset({400})
    ok_or_bad = frozenset({200, 400})
    too_big = frozenset({413, 400})
    cases: list[Case] = []

    def add(name: str, path: str, body: bytes | Any, expect: frozenset[int],
            content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else _json(body)
        cases.append(Case(name, path, raw, expect, content_type))

    # Valid requests of each API, for the hostile variants below.
    chat = {"model": model, "messages": USER, "max_tokens": 4}
    text = {"model": model, "prompt": "hi", "max_tokens": 4}
    message = {"model": model, "messages": USER, "max_tokens": 4}
    ollama_chat = {"model": model, "messages": USER, "stream": False,
                   "options": {"num_predict": 4}}
    ollama_gen = {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
    valid = {
        "/v1/chat/completions": chat, "/v1/completions": text, "/v1/messages": message,
        "/v1/messages/count_tokens": {"model": model, "messages": USER},
        "/api/chat": ollama_chat, "/api/generate": ollama_gen,
    }

    for path, body in valid.items():
        # Bodies that are not JSON objects, or not JSON, or not UTF-8.
        add("invalid UTF-8 bytes", path, b'{"model": "\xff\xfe\xfd", "messages": []}', bad)
        add("invalid UTF-8 in a string", path,
            b'{"model": ' + m.encode() + b', "messages": [{"role": "user", "content": "\xc3\x28"}],'
            b' "prompt": "\xc3\x28", "max_tokens": 4}', bad)
        add("lone surrogate escape", path, json.dumps(body).replace('"hi"', '"a\\ud800b"').encode(),
            bad)
        add("empty body", path, b"", bad)
        add("null body", path, b"null", bad)
        add("array body", path, b"[]", bad)
        add("truncated JSON", path, _json(body)[:-3], bad)
        add("NaN literal", path, _json(body)[:-1] + b', "temperature": NaN}', bad)
        add("Infinity literal", path, _json(body)[:-1] + b', "temperature": Infinity}', bad)
        add("1e999 (overflows to inf)", path, _json(body)[:-1] + b', "temperature": 1e999}', bad)
        # Deep JSON: the whole body, and a field of an otherwise valid request.
        add(f"{DEEP} nested arrays", path, b"[" * DEEP + b"]" * DEEP, bad)
        add(f"{DEEP} nested arrays in a field", path,
            _json(body)[:-1] + b', "metadata": ' + b"[" * DEEP + b"]" * DEEP + b"}", bad)
        add(f"{DEEP} nested objects in a field", path,
            _json(body)[:-1] + b', "metadata": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
            bad)
        # A 10 MB string (the body limit is 8 MiB).
        add("10 MB string", path, {**body, "messages": [{"role": "user", "content": "x" * TEN_MB}],
                                   "prompt": "x" * TEN_MB}, too_big)
        # Wrong types.
        add("wrong types", path, {"model": 5, "messages": "hi", "prompt": 7, "max_tokens": "4"},
            bad)
        add("model is null", path, {**body, "model": None}, bad)
        # Null bytes are just characters.
        add("null bytes", path, json.dumps(body).replace('"hi"', '"a\\u0000b"').encode(),
            frozenset({200}))
        add("null byte in model name", path, {**body, "model": model + "\u0000"},
            frozenset({404, 400}))
        add("text/plain content type", path, body, frozenset({200, 400, 415}), "text/plain")

    # Huge numbers, negative and absurd token counts, per API.
    for name, value in [("1e308", 1e308), ("2**70", 2**70), ("-2**70", -(2**70))]:
        for field in ("max_tokens", "seed", "top_k", "max_completion_tokens"):
            add(f"{field}={name}", "/v1/chat/completions", {**chat, field: value}, ok_or_bad)
        for field in ("max_tokens", "top_k"):
            add(f"{field}={name}", "/v1/messages", {**message, field: value}, ok_or_bad)
        for field in ("num_predict", "seed", "top_k", "num_ctx", "repeat_last_n", "temperature",
                      "presence_penalty", "frequency_penalty", "repeat_penalty"):
            add(f"options.{field}={name}", "/api/chat",
                {**ollama_chat, "options": {"num_predict": 4, field: value}}, ok_or_bad)
        add(f"token id {name}", "/v1/completions", {**text, "prompt": [value]}, bad)
    add("max_tokens=2**70 streaming", "/v1/chat/completions",
        {**chat, "max_tokens": 2**70, "stream": True}, frozenset({200}))
    add("top_k=2**70 streaming", "/v1/messages", {**message, "top_k": 2**70, "stream": True}, bad)
    add("negative max_tokens", "/v1/chat/completions", {**chat, "max_tokens": -5}, bad)
    add("negative max_tokens", "/v1/completions", {**text, "max_tokens": -5}, bad)
    add("negative max_tokens", "/v1/messages", {**message, "max_tokens": -1}, bad)
    add("negative num_predict", "/api/chat",
        {**ollama_chat, "options": {"num_predict": -7}}, bad)
    add("negative token id", "/v1/completions", {**text, "prompt": [-1]}, bad)
    add("temperature 1e-320 (denormal)", "/v1/chat/completions",
        {**chat, "temperature": 1e-320}, frozenset({200}))

    # Unknown roles, empty conversations.
    add("unknown role", "/v1/chat/completions",
        {**chat, "messages": [{"role": "wizard", "content": "x"}]}, bad)
    add("unknown role", "/v1/messages",
        {**message, "messages": [{"role": "system", "content": "x"}]}, bad)
    add("unknown role", "/api/chat", {**ollama_chat, "messages": [{"role": "x", "content": "y"}]},
        bad)
    add("empty messages", "/v1/chat/completions", {**chat, "messages": []}, bad)
    add("empty messages", "/v1/messages", {**message, "messages": []}, bad)
    # Ollama answers an empty conversation with a "load" response, as Ollama does.
    add("empty messages", "/api/chat", {**ollama_chat, "messages": []}, frozenset({200}))
    add("empty prompt", "/v1/completions", {**text, "prompt": ""}, bad)
    add("empty token list", "/v1/completions", {**text, "prompt": []}, bad)
    add("message without content", "/v1/chat/completions",
        {**chat, "messages": [{"role": "user"}]}, bad)

    # Limits: stop strings, message count, context.
    add("10,000 distinct stop strings", "/v1/chat/completions",
        {**chat, "stop": [f"stop{i}" for i in range(10_000)]}, bad)
    add("a 100 kB stop string", "/v1/messages", {**message, "stop_sequences": ["s" * 100_000]},
        bad)
    add("many stop strings", "/api/chat",
        {**ollama_chat, "options": {"num_predict": 4, "stop": [f"s{i}" for i in range(1000)]}},
        bad)
    add("100,000 messages", "/v1/chat/completions", {**chat, "messages": USER * 100_000}, bad)
    add("100,000 messages", "/v1/messages", {**message, "messages": USER * 100_000}, bad)
    add("100,000 messages", "/api/chat", {**ollama_chat, "messages": USER * 100_000}, bad)
    add("prompt over the context", "/v1/chat/completions",
        {**chat, "messages": [{"role": "user", "content": "x " * 2000}]}, bad)
    return cases


def _post(client: httpx.Client, case: Case) -> httpx.Response:
    return client.post(case.path, content=case.body, headers={"content-type": case.content_type})


def test_hand_written_hostile_requests(node: LiveAgent) -> None:
    runners = node.runner_pids()
    assert runners, "the model's runner should be up"
    failures = []
    with httpx.Client(base_url=node.url, timeout=60) as client:
        for case in hand_written_cases(str(node.model)):
            response = _post(client, case)
            api = api_of(case.path)
            problem = answer_problem(api, response)
            if problem is None and response.status_code not in case.expect:
                problem = f"status {response.status_code}, expected one of {sorted(case.expect)}"
            if problem is None and response.status_code >= 400:
                problem = error_format_problem(api, response)
            if problem:
                failures.append(f"{case.path} {case.name}: {problem}")
    assert not failures, "\n".join(failures)
    assert_alive(node, runners)


def test_unknown_paths_and_methods_answer_in_the_paths_format(node: LiveAgent) -> None:
    with httpx.Client(base_url=node.url, timeout=30) as client:
        for method, path, status in [("GET", "/v1/chat/completions", 405),
                                     ("DELETE", "/v1/messages", 405),
                                     ("PUT", "/api/chat", 405),
                                     ("GET", "/v1/nothing", 404),
                                     ("GET", "/api/nothing", 404),
                                     ("GET", "/v1/messages/nothing", 404)]:
            response = client.request(method, path)
            assert response.status_code == status, (method, path, response.text)
            assert error_format_problem(api_of(path), response) is None, response.text


def test_huge_headers_are_refused_and_the_agent_lives(node: LiveAgent) -> None:
    """The request head is bounded (64 KiB): a 1 MB header, or 2 MB in many headers, gets 400
    (or the connection closed while it is still being sent), never an answer or a crash."""
    runners = node.runner_pids()
    host, port = "127.0.0.1", node.port
    for head in (b"X-Big: " + b"a" * 1_000_000 + b"\r\n",
                 b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 100) for i in range(20_000))):
        with socket.create_connection((host, port), timeout=30) as s:
            try:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
                answer = s.recv(200)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""  # refused while we were still sending: the head was too large
        assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer
    # A normal-size head still works.
    response = httpx.get(f"{node.url}/v1/models", headers={"x-padding": "a" * 4000}, timeout=30)
    assert response.status_code == 200
    assert_alive(node, runners)


def test_a_long_prompt_does_not_stall_the_agent(node: LiveAgent) -> None:
    """While a huge prompt is templated and tokenized (to be refused: it exceeds the context),
    /healthz keeps answering at once: templating and tokenizing run off the event loop (a 7 MB
    prompt used to stall every request and probe for 40 s; d8f5161)."""
    body = {"model": str(node.model), "max_tokens": 4,
            "messages": [{"role": "user", "content": "x " * 1_000_000}]}
    answer: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
        f"{node.url}/v1/chat/completions", json=body, timeout=300)))
    sender.start()
    worst = 0.0
    with httpx.Client(base_url=node.url, timeout=300) as client:
        while sender.is_alive():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.1)
    sender.join()
    assert answer["r"].status_code == 400, answer["r"].text
    assert worst < 1.5, f"/healthz took {worst:.1f}s while a long prompt was tokenized"


def test_token_ids_past_the_vocabulary_are_a_400(tmp_path: Path) -> None:
    """The runner refuses ids past the vocabulary before any work (10**9 used to segfault it, an
    id just past it read beyond the embedding): a 400, and the same runner serves on."""
    model = make_tiny_model(tmp_path / "tiny")  # a vocabulary of 259 tokens
    agent = start_agent(tmp_path / "state", model=str(model), args=["--no-discovery"])
    try:
        runners = agent.runner_pids()
        with httpx.Client(base_url=agent.url, timeout=60) as client:
            for ids in ([259], [10**9], [5, 2**31 - 1]):
                response = client.post("/v1/completions", json={
                    "model": str(model), "prompt": ids, "max_tokens": 2})
                assert response.status_code == 400, response.text
        assert_alive(agent, runners)
    finally:
        agent.stop()


# --- schemathesis ------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("FLOCK_FUZZ_EXAMPLES", "25"))
FUZZ_SECONDS = float(os.environ.get("FLOCK_FUZZ_SECONDS", "240"))

# Not fuzzed: /api/pull downloads from the internet; the cluster's admin and agent-to-agent
# writes (placements, specs, assignments, shard tensors) change what the node serves, and
# /cluster/generate takes raw token ids (tests/test_security.py covers who may call them).
NOT_FUZZED = {
    ("POST", "/api/pull"), ("POST", "/cluster/assignment"), ("POST", "/cluster/generate"),
    ("POST", "/cluster/instances"), ("DELETE", "/cluster/instances/{instance_id}"),
    ("POST", "/cluster/spec"), ("POST", "/cluster/models/{model}/tensors"),
}


def _closed_objects(node: Any) -> None:
    """Request models forbid unknown fields, but the generated schema does not say so; close
    every object so positive examples are valid requests rather than unknown-field 400s."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed_objects(value)
    elif isinstance(node, list):
        for value in node:
            _closed_objects(value)


# Fields whose semantic checks (beyond the schema) turn nearly every generated value into a 400
# before any work; dropped from the examples aimed at the model so those reach the runner.
_SEMANTIC_FIELDS = (
    "tools", "tool_choice", "parallel_tool_calls", "modalities", "n", "best_of", "logit_bias",
    "response_format", "format", "output_config", "thinking", "think", "suffix", "echo", "images",
    "raw", "template", "context", "system", "top_logprobs", "logprobs",
)


def _aim_at_the_model(body: Any, model: str, use_model: bool) -> Any:
    """Generated model names are random (a 404 before any work), and generated conversations
    rarely pass the adapters' checks. Half the examples keep everything generated; the other
    half are aimed at the served model with one plain user turn and without the semantically
    checked fields, so their sampling parameters, stops and lengths reach the runner.

    Token ids are kept inside the tiny vocabulary in both, so that prompts given as ids reach
    the model (ids past it have their own test)."""
    if not isinstance(body, dict):
        return body
    if use_model and body.keys() & {"model", "messages", "prompt"}:
        body["model"] = model
        for name in _SEMANTIC_FIELDS:
            body.pop(name, None)
        if "messages" in body:
            body["messages"] = [{"role": "user", "content": "hi"}]
        if isinstance(body.get("options"), dict):
            body["options"].pop("num_ctx", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        body["prompt"] = [
            [t % 256 for t in p] if isinstance(p, list) and all(type(t) is int for t in p)
            else (p % 256 if type(p) is int else p)
            for p in prompt
        ]
    return body


def test_schemathesis_finds_no_server_errors(node: LiveAgent) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    document = httpx.get(f"{node.url}/schema/openapi.json", timeout=30).json()
    _closed_objects(document)
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations
                  if (op.method.upper(), op.path) not in NOT_FUZZED]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    runners = node.runner_pids()
    deadline = time.monotonic() + FUZZ_SECONDS
    failures: dict[tuple[str, str, int], str] = {}
    counts = {"calls": 0, "success": 0}
    statuses: dict[str, collections.Counter[int]] = {}

    def check(operation: Any, case: Any, use_model: bool) -> None:
        if time.monotonic() > deadline:
            return
        case.body = _aim_at_the_model(case.body, str(node.model), use_model)
        key = (operation.method.upper(), operation.path)
        try:
            response = case.call(base_url=node.url, timeout=60)
        except Exception as exc:  # a dropped connection is a failure too
            failures.setdefault((*key, -1), f"{type(exc).__name__}: {exc}")
            return
        counts["calls"] += 1
        counts["success"] += response.status_code < 300
        statuses.setdefault(f"{key[0]} {key[1]}", collections.Counter())[response.status_code] += 1
        api = api_of(operation.path)
        status = response.status_code
        problem = None
        if status >= 500 and status != OVERLOAD_STATUS[api]:
            problem = f"{status}: {response.text[:300]!r}"
        elif status >= 400 and operation.path.startswith(("/v1/", "/api/")):
            problem = error_format_problem(api, _as_httpx(response))
        if problem:
            failures.setdefault((*key, status),
                                f"{problem}\n    {case.as_curl_command()[:600]}")

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz = given(case=operation.as_strategy(generation_mode=mode),
                         use_model=st.booleans())(
                settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         derandomize=True, phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))(
                    _bound(check, operation)))
            # Unsatisfiable: no negative example exists (no parameters or body to break).
            with contextlib.suppress(Unsatisfiable):
                fuzz()
    for operation_name, seen in statuses.items():
        print(f"{operation_name}: {dict(sorted(seen.items()))}")
    report = "\n".join(f"{m} {p} -> {s}: {why}" for (m, p, s), why in failures.items())
    assert not failures, report
    assert counts["calls"] >= len(operations), counts
    assert counts["success"] > 0, "no generated request succeeded: the fuzzing never got deep"
    assert_alive(node, runners)


def _bound(check: Any, operation: Any) -> Any:
    """check(operation, ...) as a plain function of the case, for hypothesis' @given."""

    def fuzz_one(case: Any, use_model: bool) -> None:
        check(operation, case, use_model)

    return fuzz_one


def _as_httpx(response: Any) -> httpx.Response:
    """schemathesis answers with its own Response type; judge it like any other."""
    headers = [(name, value) for name, values in response.headers.items()
               for value in (values if isinstance(values, list) else [values])]
    return httpx.Response(response.status_code, headers=headers, content=response.content)


# --- after all that ----------------------------------------------------------------------------


def assert_alive(node: LiveAgent, runners: list[int]) -> None:
    """The agent answers its probes and a valid request of each API, on the same runner."""
    assert node.alive(), node.log_text()[-3000:]
    with httpx.Client(base_url=node.url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        model = str(node.model)
        chat = client.post("/v1/chat/completions",
                           json={"model": model, "messages": USER, "max_tokens": 3})
        assert chat.status_code == 200, chat.text
        message = client.post("/v1/messages",
                              json={"model": model, "messages": USER, "max_tokens": 3})
        assert message.status_code == 200, message.text
        ollama = client.post("/api/chat", json={"model": model, "messages": USER, "stream": False,
                                                "options": {"num_predict": 3}})
        assert ollama.status_code == 200, ollama.text
    assert node.runner_pids() == runners, "the runner restarted: something crashed it"
